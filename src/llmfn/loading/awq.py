"""Quantized safetensors checkpoints: AutoAWQ GEMM and llmfn int8, read into llmfn.kernels.quant leaves.

On-disk formats (safetensors, `quantization_config` in config.json):
  AutoAWQ GEMM  {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": true, "version": "gemm"}
      <linear>.qweight int32 [k, n / 8]   eight 4-bit q along the output dim, nibble i (bits 4i..4i+3)
                                          holding column 8c + AWQ_ORDER[i], AWQ_ORDER = 0 2 4 6 1 3 5 7
      <linear>.qzeros  int32 [k / g, n / 8]  zero points z, packed the same way
      <linear>.scales  fp16  [k / g, n]
  llmfn int8    {"quant_method": "llmfn_int8", "bits": 8, "group_size": g or -1 (per channel)}
      <linear>.qweight int8 [n, k]; <linear>.scales fp16 [n, k / g]; w = q * s, q in -127..127
GPTQ (converted to AWQ by llmfn.loading.convert, not loaded directly):
      qweight int32 [k / 8, n] packed along the input dim in plain order; qzeros int32 [k / g, n / 8]
      packed along the output dim in plain order, holding z - 1 ("gptq" v1 format) or z ("gptq_v2");
      scales fp16 [k / g, n]; g_idx int32 [k] (i // g unless desc_act).
"""

from __future__ import annotations

import torch

from llmfn.errors import CheckpointError, UnsupportedModelError
from llmfn.kernels.quant import Int4Weight, Int8Weight
from llmfn.loading.quantize import Pending


def read_quantization_config(raw: dict, source) -> dict:
    """The checkpoint's quantization_config, checked to be a format llmfn loads."""
    qc = raw.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if qc.get("bits", 4) != 4:
            raise UnsupportedModelError(f"{source}: AWQ with {qc.get('bits')} bits is not supported (4 is)")
        if version != "gemm":
            raise UnsupportedModelError(f"{source}: AWQ version {version!r} is not supported (gemm is)")
        if qc.get("zero_point", True) is not True:
            raise UnsupportedModelError(f"{source}: AWQ without zero points is not supported")
        return {"quant_method": "awq", "group_size": int(qc.get("group_size", 128))}
    if method == "llmfn_int8":
        return {"quant_method": method, "group_size": int(qc.get("group_size", -1))}
    if method == "gptq":
        raise UnsupportedModelError(f"{source}: GPTQ checkpoints load after `llmfn convert gptq-to-awq IN OUT`")
    raise UnsupportedModelError(f"{source}: quantization {method or qc!r} is not supported (awq, llmfn_int8 are)")


def quantized_tensors(tensors: dict[str, torch.Tensor], qc: dict, source) -> dict:
    """Replace each quantized linear's tensors (<name>.qweight, ...) by <name>.weight -> a Pending leaf."""
    out = {}
    for name in [n for n in tensors if n.endswith(".qweight")]:
        base = name.removesuffix(".qweight")
        try:
            qweight = tensors.pop(name)
            scales = tensors.pop(base + ".scales")
            if qc["quant_method"] == "awq":
                qzeros = tensors.pop(base + ".qzeros")
                k, g = qweight.shape[0], qc["group_size"]
                g = k if g in (-1, 0) else g
                want = {"qzeros": (k // g, qweight.shape[1]), "scales": (k // g, qweight.shape[1] * 8)}
                for what, t in (("qzeros", qzeros), ("scales", scales)):
                    if tuple(t.shape) != want[what] or k % g:
                        raise CheckpointError(f"{source}: {base}.{what} has shape {tuple(t.shape)}, expected {want[what]}")
                leaf = Int4Weight.from_awq(qweight, qzeros, scales, g)
            else:
                k = qweight.shape[1]
                g = k if qc["group_size"] in (-1, 0) else qc["group_size"]
                leaf = Int8Weight.from_q(qweight, scales, g)
        except KeyError as e:
            raise CheckpointError(f"{source}: quantized {base!r} lacks {e.args[0]!r}") from None
        out[base + ".weight"] = Pending(leaf)
    out.update(tensors)
    return out


