"""Checkpoint conversions behind `llmfn convert gptq-to-awq` and `llmfn convert quantize`.

    convert_gptq_to_awq(IN, OUT)                       GPTQ 4-bit (desc_act false) -> AutoAWQ GEMM, lossless
    quantize_checkpoint(IN, OUT, "rtn-int4", 128)      float -> AutoAWQ GEMM layout, round to nearest
    quantize_checkpoint(IN, OUT, "rtn-int8", 128)      float -> llmfn int8 layout (group_size -1: per channel)

Layouts are documented in llmfn.loading.awq. Only the decoder's linear layers (`layers.N.*_proj.weight`)
are quantized, as AutoAWQ does; embeddings, norms and lm_head are copied. Tokenizer and other
non-weight files are copied; config.json is written last (its presence marks a finished folder).
`progress(done, total, name)` is called once per converted linear when given.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmfn.errors import CheckpointError, UnsupportedModelError
from llmfn.kernels.quant import pack_awq, pack_int32, rtn_int4, rtn_int8, unpack_int32
from llmfn.loading.checkpoint import read_tensors, weight_files
from llmfn.loading.config import read_json
from llmfn.loading.quantize import normalize_method

Progress = Callable[..., None] | None
LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
WEIGHT_FILES = re.compile(r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.pt|\.pth)$")


def _read(in_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors, and the file each came from (so sharded checkpoints stay sharded)."""
    tensors, origin = {}, {}
    for file in weight_files(in_dir):
        for name, t in read_tensors([file]).items():
            tensors[name] = t
            origin[name] = file.name
    return tensors, origin


def _write(out_dir: Path, in_dir: Path, tensors: dict[str, torch.Tensor], origin: dict[str, str], raw: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in in_dir.iterdir():
        if f.is_file() and not WEIGHT_FILES.search(f.name) and f.name not in ("config.json", "quantize_config.json"):
            shutil.copy2(f, out_dir / f.name)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        shards.setdefault(origin[name], {})[name] = t.contiguous()
    for file, part in shards.items():
        save_file(part, str(out_dir / (file + ".partial")), metadata={"format": "pt"})
        (out_dir / (file + ".partial")).replace(out_dir / file)
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": {name: origin[name] for name in sorted(tensors)}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return out_dir


def _report(progress: Progress, done: int, total: int, name: str) -> None:
    if progress is not None:
        progress(done, total, name)


# ---------------------------------------------------------------------------------------------
# GPTQ -> AWQ


def gptq_config(in_dir: Path, raw: dict) -> dict:
    """The GPTQ quantization config (config.json's quantization_config or quantize_config.json), checked."""
    qc = raw.get("quantization_config")
    source = in_dir / "config.json"
    if qc is None and (in_dir / "quantize_config.json").exists():
        qc, source = read_json(in_dir / "quantize_config.json"), in_dir / "quantize_config.json"
    if not qc or str(qc.get("quant_method", "gptq")).lower() != "gptq":
        raise CheckpointError(f"{source}: not a GPTQ checkpoint (quant_method {qc and qc.get('quant_method')!r})")
    if qc.get("bits") != 4:
        raise UnsupportedModelError(f"{source}: GPTQ with {qc.get('bits')} bits cannot become AWQ (only 4-bit GPTQ can)")
    if qc.get("desc_act"):
        raise UnsupportedModelError(
            f"{source}: GPTQ with desc_act true (act-order) has no AWQ equivalent: its groups follow a permuted "
            "input order; re-quantize with desc_act false"
        )
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2 are)")
    return {"group_size": int(qc.get("group_size", 128)), "v1": fmt == "gptq"}


def convert_gptq_to_awq(in_dir: str | Path, out_dir: str | Path, progress: Progress = None) -> Path:
    """Repack a 4-bit GPTQ checkpoint (desc_act false, any group size) as AutoAWQ GEMM, losslessly:
    every dequantized weight (q - z) * s is the same before and after. Returns out_dir."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    raw = read_json(in_dir / "config.json")
    qc = gptq_config(in_dir, raw)
    tensors, origin = _read(in_dir)
    bases = sorted(n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight"))
    if not bases:
        raise CheckpointError(f"{in_dir}: no GPTQ tensors (*.qweight)")
    in_features = {b: tensors[b + ".qweight"].shape[0] * 8 for b in bases}
    # Per-channel GPTQ (group_size -1) becomes groups of the gcd of all input dims, the scale repeated.
    g = qc["group_size"] if qc["group_size"] > 0 else math.gcd(*in_features.values())
    gptq_parts = {b + s for b in bases for s in (".qweight", ".qzeros", ".scales", ".g_idx")}
    out: dict[str, torch.Tensor] = {n: t for n, t in tensors.items() if n not in gptq_parts}  # biases stay
    for i, base in enumerate(bases):
        try:
            qweight, qzeros, scales = (tensors[base + s] for s in (".qweight", ".qzeros", ".scales"))
        except KeyError as e:
            raise CheckpointError(f"{in_dir}: GPTQ {base!r} lacks {e.args[0]!r}") from None
        k, n = in_features[base], qweight.shape[1]
        g_in = qc["group_size"] if qc["group_size"] > 0 else k
        if k % g_in or k % g or n % 8 or tuple(scales.shape) != (k // g_in, n) or tuple(qzeros.shape) != (k // g_in, n // 8):
            raise CheckpointError(f"{in_dir}: GPTQ {base} has shapes qweight {tuple(qweight.shape)}, "
                                  f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)} for group size {g_in}")
        g_idx = tensors.get(base + ".g_idx")
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // g_in):
            raise UnsupportedModelError(f"{in_dir}: {base}.g_idx is not in order (act-order); it cannot become AWQ")
        q = unpack_int32(qweight.t().contiguous())  # [n, k]: GPTQ packs 8 input rows per word
        z = unpack_int32(qzeros).to(torch.int16) + (1 if qc["v1"] else 0)  # [k/g_in, n]
        if (z > 15).any():
            raise UnsupportedModelError(
                f"{in_dir}: {base} has a GPTQ v1 zero point of 16 (stored as 15 + 1), which 4-bit AWQ cannot hold")
        z = z.repeat_interleave(g_in // g, dim=0) if g_in != g else z  # [k/g, n]
        scales = scales.repeat_interleave(g_in // g, dim=0) if g_in != g else scales
        out[base + ".qweight"] = pack_awq(q.t())  # [k, n/8]
        out[base + ".qzeros"] = pack_awq(z)  # [k/g, n/8]
        out[base + ".scales"] = scales.to(torch.float16)
        for s in (".qweight", ".qzeros", ".scales"):
            origin[base + s] = origin[base + ".qweight"]
        _report(progress, i + 1, len(bases), base)
    raw = dict(raw)
    raw["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    return _write(out_dir, in_dir, out, origin, raw)


def pack_gptq(q: torch.Tensor, z: torch.Tensor, scales: torch.Tensor, v1: bool = True) -> dict[str, torch.Tensor]:
    """GPTQ tensors for q [n, k], zeros z [k/g, n] and scales [k/g, n] (used by tests and tools):
    qweight int32 [k/8, n], qzeros int32 [k/g, n/8] (z - 1 for the v1 format), scales fp16, g_idx."""
    n, k = q.shape
    g = k // z.shape[0]
    stored = (z.to(torch.int64) - (1 if v1 else 0)) & 0xF
    return {"qweight": pack_int32(q).t().contiguous(), "qzeros": pack_int32(stored), "scales": scales.to(torch.float16).contiguous(),
            "g_idx": (torch.arange(k) // g).to(torch.int32)}


# ---------------------------------------------------------------------------------------------
# Round-to-nearest quantization


def quantize_checkpoint(in_dir: str | Path, out_dir: str | Path, method: str, group_size: int = 128,
                        progress: Progress = None) -> Path:
    """Quantize a float Llama-family checkpoint's decoder linears by round to nearest, per group.

    method "rtn-int4": the AutoAWQ GEMM layout (asymmetric, integer zero points, fp16 scales; any
    AWQ loader reads it). "rtn-int8": llmfn's int8 layout (symmetric, fp16 scales); group_size -1
    is one scale per output channel. Returns out_dir."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    bits = 4 if normalize_method(method) == "int4" else 8
    raw = read_json(in_dir / "config.json")
    if raw.get("quantization_config"):
        raise CheckpointError(f"{in_dir / 'config.json'}: the checkpoint is already quantized")
    tensors, origin = _read(in_dir)
    names = sorted(n for n, t in tensors.items() if LINEAR.search(n) and t.dim() == 2 and t.is_floating_point())
    if not names:
        raise CheckpointError(f"{in_dir}: no decoder linear weights (layers.N.*_proj.weight) to quantize")
    if group_size <= 0 and bits == 4:
        raise CheckpointError("rtn-int4 needs a positive group size (AWQ stores one per checkpoint)")
    _check_group_size(in_dir, {n: tensors[n].shape[1] for n in names}, group_size)
    out = {n: t for n, t in tensors.items() if n not in names}
    for i, name in enumerate(names):
        base = name.removesuffix(".weight")
        w = tensors[name]
        n_out, k = w.shape
        if bits == 4:
            if n_out % 8:
                raise CheckpointError(f"{in_dir}: {name} has {n_out} outputs; AWQ packs them 8 to an int32")
            q, z, s = rtn_int4(w, group_size, torch.float16)
            out[base + ".qweight"] = pack_awq(q.t())  # [k, n/8]
            out[base + ".qzeros"] = pack_awq(z.to(torch.uint8).t())  # [k/g, n/8]
            out[base + ".scales"] = s.t().contiguous()  # [k/g, n] fp16
            parts = (".qweight", ".qzeros", ".scales")
        else:
            q, s = rtn_int8(w, k if group_size <= 0 else group_size, torch.float16)
            out[base + ".qweight"], out[base + ".scales"] = q, s
            parts = (".qweight", ".scales")
        for p in parts:
            origin[base + p] = origin[name]
        _report(progress, i + 1, len(names), base)
    raw = dict(raw)
    if bits == 4:
        raw["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                      "version": "gemm", "modules_to_not_convert": None}
    else:
        raw["quantization_config"] = {"quant_method": "llmfn_int8", "bits": 8, "group_size": group_size if group_size > 0 else -1}
    return _write(out_dir, in_dir, out, origin, raw)


def _check_group_size(in_dir: Path, in_features: dict[str, int], group_size: int) -> None:
    if group_size <= 0:
        return
    bad = [(n, k) for n, k in in_features.items() if k % group_size]
    if bad:
        common = math.gcd(*in_features.values())
        fits = max((g for g in (8, 16, 32, 64, 128, 256) if common % g == 0 and g <= group_size), default=None)
        hint = f"; --group-size {fits} divides them all" if fits else ""
        raise CheckpointError(f"{in_dir}: group size {group_size} does not divide the input dim {bad[0][1]} of {bad[0][0]}{hint}")
