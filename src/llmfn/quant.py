"""Weight-only int4 and int8 weights: leaf types behind `llmfn.linear`, and the formats that load
into them (AutoAWQ checkpoints, llmfn int8 checkpoints, GGUF Q4_0 / Q4_1 / Q8_0, round to nearest).

Leaf types (what a params pytree holds where a float [out, in] weight would be):

  Int4Weight   w[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g]       q in 0..15
      qweight  uint8 [n, k // 2]: byte (j, i) holds q[j, 2i] in its low nibble and q[j, 2i + 1] in
               its high nibble (llmfn.kernels.pack_int4: rows are output features, like nn.Linear).
      scales, offsets  float32 [n, k // g].
      An offset instead of a zero point, so every source maps on exactly (bit for bit, because q * s
      is exact in fp32 for fp16 scales and the sum then rounds once, as the source formula does):
        AWQ / GPTQ  w = (q - z) * s     ->  scales = s, offsets = -z * s
        GGUF Q4_0   w = d * (q - 8)     ->  scales = d, offsets = -8 * d
        GGUF Q4_1   w = d * q + m       ->  scales = d, offsets = m
      On CUDA the Triton GEMM of llmfn.kernels takes zero points (w = (q - zeros) * scales); `.to("cuda")`
      adds zeros = -offsets / scales (0 where a scale is 0, i.e. an all-equal block, which then reads 0).
  Int8Weight   w[n, k] = q[n, k] * scales[n, k // g]                            q in -128..127
      qweight  int8 [n, k]; scales float32 [n, k // g]; g == k is per output channel (llmfn's RTN
      int8), g == 32 is GGUF Q8_0 (w = d * q).

Both carry `dtype`, the activation dtype: `embedding(ids)` and `dequantize()` return it and
`linear(x)` returns x's dtype. Every method returns new values; leaves are immutable pytree nodes.

On-disk formats read here (safetensors, `quantization_config` in config.json):
  AutoAWQ GEMM  {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": true, "version": "gemm"}
      <linear>.qweight int32 [k, n / 8]   eight 4-bit q along the output dim, nibble i (bits 4i..4i+3)
                                          holding column 8c + AWQ_ORDER[i], AWQ_ORDER = 0 2 4 6 1 3 5 7
      <linear>.qzeros  int32 [k / g, n / 8]  zero points z, packed the same way
      <linear>.scales  fp16  [k / g, n]
  llmfn int8    {"quant_method": "llmfn_int8", "bits": 8, "group_size": g or -1 (per channel)}
      <linear>.qweight int8 [n, k]; <linear>.scales fp16 [n, k / g]; w = q * s, q in -127..127
GPTQ (converted to AWQ by llmfn.convert, not loaded directly):
      qweight int32 [k / 8, n] packed along the input dim in plain order; qzeros int32 [k / g, n / 8]
      packed along the output dim in plain order, holding z - 1 ("gptq" v1 format) or z ("gptq_v2");
      scales fp16 [k / g, n]; g_idx int32 [k] (i // g unless desc_act).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from llmfn.errors import CheckpointError, LlmfnError, UnsupportedModelError
from llmfn.kernels import cpu_quant
from llmfn.kernels.reference import pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PLAIN_ORDER = tuple(range(8))


# ---------------------------------------------------------------------------------------------
# int32 nibble packing (AWQ / GPTQ)


def pack_int32(q: torch.Tensor, order: tuple[int, ...] = PLAIN_ORDER) -> torch.Tensor:
    """[r, c] integers in 0..15 -> int32 [r, c / 8]; nibble i of word j holds q[:, 8j + order[i]]."""
    r, c = q.shape
    if c % 8:
        raise LlmfnError(f"cannot pack {c} columns into int32 words of 8 nibbles")
    q = q.to(torch.int64).view(r, c // 8, 8)[..., list(order)]  # [r, c/8, 8] in nibble order
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (q << shifts).sum(-1)  # [r, c/8], 0 .. 2^32 - 1
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as two's complement


def unpack_int32(p: torch.Tensor, order: tuple[int, ...] = PLAIN_ORDER) -> torch.Tensor:
    """int32 [r, c / 8] -> uint8 [r, c] values 0..15 (inverse of pack_int32)."""
    r, w = p.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = ((p[..., None] >> shifts) & 0xF).to(torch.uint8)  # [r, w, 8] in nibble order
    inverse = [order.index(i) for i in range(8)]
    return nibbles[..., inverse].reshape(r, w * 8)


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """[r, c] in 0..15 -> AWQ int32 [r, c / 8] (nibbles in AWQ_ORDER)."""
    return pack_int32(q, AWQ_ORDER)


def unpack_awq(p: torch.Tensor) -> torch.Tensor:
    return unpack_int32(p, AWQ_ORDER)


# ---------------------------------------------------------------------------------------------
# Leaf types


def _fp32_cpu(q: torch.Tensor, *floats: torch.Tensor) -> bool:
    """Leaves the C kernels read as they are: CPU, contiguous, fp32 scales / offsets."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in (q, *floats)) and all(
        t.dtype == torch.float32 for t in floats
    )


def _cpu_kernels(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and cpu_quant.available()


@dataclass(frozen=True, eq=False)
class Int4Weight:
    qweight: torch.Tensor  # uint8 [n, k/2]
    scales: torch.Tensor  # fp32 [n, k/g]
    offsets: torch.Tensor  # fp32 [n, k/g]
    group_size: int
    dtype: torch.dtype = torch.float32
    zeros: torch.Tensor | None = None  # CUDA only: the kernels layout's zero points

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.qweight.shape[1] * 2)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def numel(self) -> int:
        """Weights represented (n * k), so parameter counts match the float model."""
        return self.shape[0] * self.shape[1]

    def fused_args(self) -> tuple | None:
        """(kind 1, qweight, scales, offsets, group) pointers for the fused C decoder layer
        (kernels/cpu.py), or None when its int4 kernel cannot take this weight."""
        ok = _fp32_cpu(self.qweight, self.scales, self.offsets) and cpu_quant.int4_ok(self.shape[1], self.group_size)
        if not ok:
            return None
        return (1, self.qweight.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(), self.group_size)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., k] -> x @ w.T [..., n] in x's dtype."""
        n, k = self.shape
        if x.is_cuda:
            from llmfn.kernels import int4_matmul

            zeros = self.zeros if self.zeros is not None else self.kernel_layout()[2]
            return int4_matmul(x, self.qweight, self.scales, zeros, self.group_size)
        x2 = x.reshape(-1, k).float().contiguous()
        if torch.compiler.is_compiling():
            y = torch.ops.llmfn.int4_linear_cpu(x2, self.qweight, self.scales, self.offsets, self.group_size)
        else:
            y = _int4_linear_cpu(x2, self.qweight, self.scales, self.offsets, self.group_size)
        return y.to(x.dtype).view(*x.shape[:-1], n)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows at ids: [..., k] in self.dtype."""
        g = self.group_size
        q = unpack_int4(self.qweight[ids]).float()  # [..., k]
        q = q.unflatten(-1, (-1, g))  # [..., G, g]
        w = q * self.scales[ids][..., None] + self.offsets[ids][..., None]
        return w.flatten(-2).to(self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [n, k]: q * scales + offsets in fp32, then cast to dtype (default self.dtype)."""
        dtype = dtype or self.dtype
        if _cpu_kernels(self.qweight) and cpu_quant.int4_ok(self.shape[1], self.group_size):
            return cpu_quant.int4_dequantize(self.qweight, self.scales, self.offsets, self.group_size).to(dtype)
        return _dequantize_int4(self.qweight, self.scales, self.offsets, self.group_size).to(dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Int4Weight:
        """Move to device and/or set the activation dtype (the packed weights keep their types)."""
        device = torch.device(device) if device is not None else self.device
        mv = lambda t: t.to(device).contiguous()
        zeros = None
        if device.type == "cuda":
            zeros = torch.where(self.scales != 0, -self.offsets / self.scales, torch.zeros_like(self.scales))
            zeros = mv(zeros)
        return Int4Weight(mv(self.qweight), mv(self.scales), mv(self.offsets), self.group_size,
                          dtype or self.dtype, zeros)

    def kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros) in llmfn.kernels' int4 layout (w = (q - zeros) * scales)."""
        zeros = torch.where(self.scales != 0, -self.offsets / self.scales, torch.zeros_like(self.scales))
        return self.qweight, self.scales, zeros

    @classmethod
    def from_q(cls, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> Int4Weight:
        """From unpacked q [n, k] (0..15) and float scales / offsets [n, k/g]."""
        n, k = q.shape
        _check_groups(k, group_size, "int4")
        if tuple(scales.shape) != (n, k // group_size) or tuple(offsets.shape) != (n, k // group_size):
            raise CheckpointError(f"int4 scales/offsets must be [{n}, {k // group_size}]")
        return cls(pack_int4(q).contiguous(), scales.float().contiguous(), offsets.float().contiguous(), group_size)

    @classmethod
    def from_zero_points(cls, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
        """From w = (q - zeros) * scales, with q [n, k], zeros and scales [n, k/g]."""
        s = scales.float()
        return cls.from_q(q, s, -zeros.float() * s, group_size)

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
        """From AutoAWQ GEMM tensors: qweight int32 [k, n/8], qzeros int32 [k/g, n/8], scales [k/g, n]."""
        q = unpack_awq(qweight).t()  # [n, k]
        z = unpack_awq(qzeros).t()  # [n, k/g]
        return cls.from_zero_points(q, z, scales.t(), group_size)

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32) -> Int4Weight:
        """Round-to-nearest asymmetric int4 of a float w [n, k] (AutoAWQ's formula, integer zero points)."""
        q, z, s = rtn_int4(w, group_size, scale_dtype)
        return cls.from_zero_points(q, z, s, group_size)


@dataclass(frozen=True, eq=False)
class Int8Weight:
    qweight: torch.Tensor  # int8 [n, k]
    scales: torch.Tensor  # fp32 [n, k/g]
    group_size: int
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def numel(self) -> int:
        """Weights represented (n * k), so parameter counts match the float model."""
        return self.shape[0] * self.shape[1]

    def fused_args(self) -> tuple | None:
        """(kind 2, qweight, scales, 0, group) pointers for the fused C decoder layer (kernels/cpu.py),
        or None when its int8 kernel cannot take this weight."""
        if not (_fp32_cpu(self.qweight, self.scales) and cpu_quant.int8_ok(self.shape[1], self.group_size)):
            return None
        return (2, self.qweight.data_ptr(), self.scales.data_ptr(), 0, self.group_size)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        if x.is_cuda:
            return F.linear(x, self.dequantize(x.dtype))
        x2 = x.reshape(-1, k).float().contiguous()
        if torch.compiler.is_compiling():
            y = torch.ops.llmfn.int8_linear_cpu(x2, self.qweight, self.scales, self.group_size)
        else:
            y = _int8_linear_cpu(x2, self.qweight, self.scales, self.group_size)
        return y.to(x.dtype).view(*x.shape[:-1], n)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.qweight[ids].float().unflatten(-1, (-1, self.group_size))  # [..., G, g]
        return (q * self.scales[ids][..., None]).flatten(-2).to(self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if _cpu_kernels(self.qweight):
            return cpu_quant.int8_dequantize(self.qweight, self.scales, self.group_size).to(dtype)
        return _dequantize_int8(self.qweight, self.scales, self.group_size).to(dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Int8Weight:
        device = torch.device(device) if device is not None else self.device
        return Int8Weight(self.qweight.to(device).contiguous(), self.scales.to(device).contiguous(),
                          self.group_size, dtype or self.dtype)

    @classmethod
    def from_q(cls, q: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int8Weight:
        n, k = q.shape
        _check_groups(k, group_size, "int8")
        if tuple(scales.shape) != (n, k // group_size):
            raise CheckpointError(f"int8 scales must be [{n}, {k // group_size}], got {list(scales.shape)}")
        return cls(q.to(torch.int8).contiguous(), scales.float().contiguous(), group_size)

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = -1, scale_dtype: torch.dtype = torch.float32) -> Int8Weight:
        """Round-to-nearest symmetric int8 of w [n, k]; group_size -1 is one scale per output channel."""
        g = w.shape[1] if group_size in (-1, 0) else group_size
        q, s = rtn_int8(w, g, scale_dtype)
        return cls.from_q(q, s, g)


QuantizedWeight = Int4Weight | Int8Weight


def is_quantized(w) -> bool:
    return isinstance(w, (Int4Weight, Int8Weight))


def cat_out(weights: list) -> torch.Tensor | QuantizedWeight:
    """Concatenate weights along the output dim (how llama fuses q/k/v and gate/up).

    Quantized parts of one type and group size stay quantized; any other mix is dequantized
    and concatenated as floats."""
    first = weights[0]
    same = all(type(w) is type(first) for w in weights) and is_quantized(first)
    same = same and all(w.group_size == first.group_size and w.shape[1] == first.shape[1] for w in weights)
    if not same:
        return torch.cat([w.dequantize(torch.float32) if is_quantized(w) else w.float() for w in weights])
    if isinstance(first, Int4Weight):
        return Int4Weight(
            torch.cat([w.qweight for w in weights]), torch.cat([w.scales for w in weights]),
            torch.cat([w.offsets for w in weights]), first.group_size, first.dtype,
            None if any(w.zeros is None for w in weights) else torch.cat([w.zeros for w in weights]),
        )
    return Int8Weight(torch.cat([w.qweight for w in weights]), torch.cat([w.scales for w in weights]),
                      first.group_size, first.dtype)


def _check_groups(k: int, group_size: int, what: str) -> None:
    if group_size <= 0 or k % group_size or (what == "int4" and group_size % 2):
        raise CheckpointError(f"{what} group size {group_size} does not divide the input dim {k}")


def _dequantize_int4(qweight, scales, offsets, g) -> torch.Tensor:
    q = unpack_int4(qweight).float()  # [n, k]
    n, k = q.shape
    return (q.view(n, k // g, g) * scales[..., None] + offsets[..., None]).view(n, k)


def _dequantize_int8(qweight, scales, g) -> torch.Tensor:
    n, k = qweight.shape
    return (qweight.float().view(n, k // g, g) * scales[..., None]).view(n, k)


def _int4_linear_cpu(x, qweight, scales, offsets, group_size) -> torch.Tensor:
    if cpu_quant.int4_ok(x.shape[1], group_size) and cpu_quant.available():
        return cpu_quant.int4_linear(x, qweight, scales, offsets, group_size)
    return F.linear(x, _dequantize_int4(qweight, scales, offsets, group_size))


def _int8_linear_cpu(x, qweight, scales, group_size) -> torch.Tensor:
    if cpu_quant.int8_ok(x.shape[1], group_size) and cpu_quant.available():
        return cpu_quant.int8_linear(x, qweight, scales, group_size)
    return F.linear(x, _dequantize_int8(qweight, scales, group_size))


# torch.compile sees the CPU kernels as opaque ops (the eager path calls them directly). They are
# registered with torch.library.Library rather than @custom_op: a custom_op call costs ~30 us on
# this machine, a plain CPU kernel ~13 us, and a decode step makes 4 per layer.
_LIB = torch.library.Library("llmfn", "FRAGMENT")
_LIB.define("int4_linear_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int group_size) -> Tensor")
_LIB.define("int8_linear_cpu(Tensor x, Tensor qweight, Tensor scales, int group_size) -> Tensor")
_LIB.impl("int4_linear_cpu", lambda x, qw, s, o, g: _int4_linear_cpu(x, qw, s, o, g), "CPU")
_LIB.impl("int8_linear_cpu", lambda x, qw, s, g: _int8_linear_cpu(x, qw, s, g), "CPU")


@torch.library.register_fake("llmfn::int4_linear_cpu", lib=_LIB)
def _(x, qweight, scales, offsets, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.register_fake("llmfn::int8_linear_cpu", lib=_LIB)
def _(x, qweight, scales, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


pytree.register_pytree_node(
    Int4Weight,
    lambda w: ([w.qweight, w.scales, w.offsets, w.zeros], (w.group_size, w.dtype)),
    lambda children, ctx: Int4Weight(*children[:3], ctx[0], ctx[1], children[3]),
    serialized_type_name="llmfn.quant.Int4Weight",
)
pytree.register_pytree_node(
    Int8Weight,
    lambda w: ([w.qweight, w.scales], (w.group_size, w.dtype)),
    lambda children, ctx: Int8Weight(*children, ctx[0], ctx[1]),
    serialized_type_name="llmfn.quant.Int8Weight",
)


# ---------------------------------------------------------------------------------------------
# Round to nearest


def rtn_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16):
    """AutoAWQ's asymmetric RTN: w [n, k] -> (q uint8 [n, k], zeros [n, k/g] (integers), scales [n, k/g]).

    Scales are rounded to scale_dtype first, and q computed against the rounded scales."""
    n, k = w.shape
    _check_groups(k, group_size, "int4")
    wg = w.float().view(n, k // group_size, group_size)
    hi, lo = wg.amax(-1), wg.amin(-1)
    scales = ((hi - lo).clamp(min=1e-5) / 15).to(scale_dtype).float()
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    q = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return q.view(n, k).to(torch.uint8), zeros, scales.to(scale_dtype)


def rtn_int8(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16):
    """Symmetric RTN: w [n, k] -> (q int8 [n, k] in -127..127, scales [n, k/g])."""
    n, k = w.shape
    _check_groups(k, group_size, "int8")
    wg = w.float().view(n, k // group_size, group_size)
    scales = (wg.abs().amax(-1).clamp(min=1e-5) / 127).to(scale_dtype).float()
    q = torch.round(wg / scales[..., None]).clamp(-127, 127)
    return q.view(n, k).to(torch.int8), scales.to(scale_dtype)


LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")


def quantize_params(params: dict, method: str, group_size: int = 32) -> dict:
    """Quantize a Llama-layout params pytree at load: "int4" puts the layer linears in int4 (RTN,
    group_size) and embed / lm_head in per-row int8; "int8" puts all of them in per-channel int8.
    Leaves that are already quantized are kept. Returns a new pytree."""
    method = normalize_method(method)
    cache: dict[int, object] = {}  # keeps a tied embed / lm_head one leaf

    def q(w, bits):
        if not isinstance(w, torch.Tensor) or id(w) in cache:
            return cache.get(id(w), w)
        if bits == 4 and w.shape[1] % group_size == 0:
            out = Int4Weight.quantize(w, group_size).to(dtype=w.dtype)
        else:
            out = Int8Weight.quantize(w).to(dtype=w.dtype)
        cache[id(w)] = out
        return out

    bits = 4 if method == "int4" else 8
    out = dict(params)
    out["embed"] = q(params["embed"], 8)
    out["lm_head"] = q(params["lm_head"], 8)
    out["layers"] = [{k: (q(v, bits) if k in LINEARS else v) for k, v in layer.items()} for layer in params["layers"]]
    return out


def normalize_method(method: str) -> str:
    m = method.lower().removeprefix("rtn-").removeprefix("rtn_")
    if m not in ("int4", "int8"):
        raise LlmfnError(f"unknown quantization {method!r} (int4, int8, rtn-int4 or rtn-int8)")
    return m


def dequantize_params(tree):
    """The same pytree with every quantized leaf replaced by its dense weight (tied leaves stay tied)."""
    seen: dict[int, torch.Tensor] = {}

    def f(w):
        if is_quantized(w):
            if id(w) not in seen:
                seen[id(w)] = w.dequantize()
            return seen[id(w)]
        return w

    return _map_leaves(tree, f)


def _map_leaves(tree, f):
    if isinstance(tree, dict):
        return {k: _map_leaves(v, f) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_leaves(v, f) for v in tree]
    return f(tree)


# ---------------------------------------------------------------------------------------------
# Quantized safetensors checkpoints (AutoAWQ, llmfn int8)


class _Pending:
    """Stands in for a quantized weight while hf_llama.params_from_hf maps names and checks shapes:
    its torch.cat of q/k/v or gate/up becomes cat_out, so naming stays in one place."""

    def __init__(self, leaf):
        self.leaf = leaf
        self.shape = leaf.shape

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat and kwargs.get("dim", args[1] if len(args) > 1 else 0) == 0:
            return _Pending(cat_out([a.leaf if isinstance(a, _Pending) else a for a in args[0]]))
        raise UnsupportedModelError(f"{func.__name__} is not supported on a quantized weight")


def _unwrap(tree):
    return _map_leaves(tree, lambda w: w.leaf if isinstance(w, _Pending) else w)


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
    """Replace each quantized linear's tensors (<name>.qweight, ...) by <name>.weight -> a pending leaf."""
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
        out[base + ".weight"] = _Pending(leaf)
    out.update(tensors)
    return out


def params_from_quantized(tensors: dict[str, torch.Tensor], cfg, qc: dict, source="model.safetensors") -> dict:
    """Like hf_llama.params_from_hf, for a checkpoint whose linears are quantized: the same pytree with
    Int4Weight / Int8Weight leaves (fused along the output dim where llama fuses)."""
    from llmfn.loading import llama as hf_llama

    return _unwrap(hf_llama.params_from_hf(quantized_tensors(tensors, qc, source), cfg, source))


def finish_params(params: dict, dtype: torch.dtype, device: str) -> dict:
    """Cast floats to dtype, move everything to device, give leaves the activation dtype; keeps ties."""
    from llmfn.loading import cast_params

    tied = params["lm_head"] is params["embed"]
    params = _map_leaves(params, lambda w: w.to(device, dtype) if is_quantized(w) else w)
    params = cast_params(params, dtype, device)
    if tied:
        params["lm_head"] = params["embed"]
    return params


def load_quantized_causal_lm(folder: Path, raw: dict, dtype: torch.dtype, device: str):
    """load_causal_lm for a checkpoint with a quantization_config (AutoAWQ GEMM, llmfn int8)."""
    from llmfn.loading import finish_causal_lm
    from llmfn.loading.checkpoint import read_tensors, weight_files
    from llmfn.loading.config import llama_config_from_hf

    qc = read_quantization_config(raw, folder / "config.json")
    cfg = llama_config_from_hf(raw, folder / "config.json")
    files = weight_files(folder)
    source = files[0] if len(files) == 1 else folder
    params = params_from_quantized(read_tensors(files), cfg, qc, source)
    return finish_causal_lm(folder, raw, cfg, finish_params(params, dtype, device))


# ---------------------------------------------------------------------------------------------
# GGUF: Q4_0 / Q4_1 / Q8_0 kept quantized

GGUF_KEPT = ("Q4_0", "Q4_1", "Q8_0")
_BLOCK = 32


def gguf_leaf(tensor) -> QuantizedWeight:
    """A GGUF Q4_0 / Q4_1 / Q8_0 tensor (rows = output features) as an Int4Weight / Int8Weight."""
    kind = tensor.tensor_type.name
    k, n = int(tensor.shape[0]), int(np.prod(tensor.shape[1:]))
    raw = np.ascontiguousarray(tensor.data).view(np.uint8)
    blocks = raw.reshape(n, k // _BLOCK, -1)  # [n, G, bytes per block]
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # [n, G]
    if kind == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        return Int8Weight.from_q(q, d, _BLOCK)
    if kind == "Q4_0":
        packed, offsets = blocks[..., 2:], -8 * d
    elif kind == "Q4_1":
        packed = blocks[..., 4:]
        offsets = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    else:
        raise UnsupportedModelError(f"GGUF type {kind} is not kept quantized ({', '.join(GGUF_KEPT)} are)")
    # GGUF byte i of a block holds q[i] (low nibble) and q[i + 16] (high); ours holds q[2i] and q[2i + 1].
    even, odd = packed[..., 0::2], packed[..., 1::2]  # [n, G, 8]
    ours = np.concatenate([(even & 0xF) | (odd << 4), (even >> 4) | (odd & 0xF0)], axis=-1)  # [n, G, 16]
    qweight = torch.from_numpy(ours.reshape(n, k // 2))
    return Int4Weight(qweight, d.contiguous(), offsets.float().contiguous(), _BLOCK)


def _rows(leaf: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
    if isinstance(leaf, Int4Weight):
        return replace(leaf, qweight=leaf.qweight[index], scales=leaf.scales[index], offsets=leaf.offsets[index])
    return replace(leaf, qweight=leaf.qweight[index], scales=leaf.scales[index])


def gguf_tensors(reader, config: dict, keep: tuple[str, ...] = GGUF_KEPT, transform=None) -> dict:
    """All tensors of a GGUF under HF names: types in `keep` as pending quantized leaves, the rest
    dequantized to fp32 with the gguf package (q / k rows un-permuted either way, as gguf_import does)
    and passed through transform(name, tensor) when given (one tensor at a time, to bound memory)."""
    from gguf.quants import dequantize

    from llmfn.loading.gguf import _unpermute, hf_name, permuted_heads

    out = {}
    for t in reader.tensors:
        name, heads = hf_name(t.name), permuted_heads(config, t.name)
        if t.tensor_type.name in keep and len(t.shape) == 2:
            leaf = gguf_leaf(t)
            if heads is not None:
                leaf = _rows(leaf, torch.from_numpy(_unpermute(np.arange(leaf.shape[0]), heads).copy()))
            out[name] = _Pending(leaf)
        else:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            if heads is not None:
                w = _unpermute(w, heads)
            w = torch.from_numpy(np.array(w))
            out[name] = transform(name, w) if transform is not None else w
    return out


def _gguf_folder(gguf_path: Path, reader, config: dict) -> Path:
    """A cached folder with the GGUF's config, tokenizer and generation files (no weights)."""
    from llmfn.gguf_tokenizer import tokenizer_files_from_gguf
    from llmfn.loading.registry import home, publish_folder

    def fill(tmp: Path) -> None:
        for name, text in tokenizer_files_from_gguf(reader).items():
            (tmp / name).write_text(text, encoding="utf-8")
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    st = gguf_path.stat()
    stamp = f"{gguf_path.resolve()}-{st.st_size}-{int(st.st_mtime)}"
    return publish_folder(home() / "models" / f"{gguf_path.stem.lower()}-meta", stamp, fill)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", keep_quantized: bool = True,
              quantize: str | None = None):
    """Load a llama / qwen2 GGUF as a Model. keep_quantized: Q4_0 / Q4_1 tensors become Int4Weight and
    Q8_0 Int8Weight (exactly the gguf package's dequantized values); other types are dequantized.
    quantize="int8": keep Q8_0 only and round the other linears to int8 (per channel) as they load."""
    from llmfn.loading import finish_causal_lm
    from llmfn.loading import llama as hf_llama
    from llmfn.loading.config import llama_config_from_hf
    from llmfn.loading.gguf import config_from_gguf, open_gguf

    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    folder = _gguf_folder(path, reader, config)
    cfg = llama_config_from_hf(config, path)
    if quantize is not None and normalize_method(quantize) == "int8":
        tensors = gguf_tensors(reader, config, ("Q8_0",), lambda n, t: quantize_tensor(n, t, "int8"))
    else:
        tensors = gguf_tensors(reader, config, GGUF_KEPT if keep_quantized else ())
    params = _unwrap(hf_llama.params_from_hf(tensors, cfg, source=path))
    return finish_causal_lm(folder, config, cfg, finish_params(params, dtype, device))


# ---------------------------------------------------------------------------------------------
# llmfn.load(..., quantize=...)


def load_quantized(path: str | Path, quantize: str, dtype: torch.dtype | None = None, device: str = "cpu",
                   group_size: int = 32):
    """`llmfn.load(path, quantize="int4" | "int8")`.

    A GGUF (file or alias) with "int4" keeps its Q4_0 / Q4_1 / Q8_0 tensors quantized (the default
    SmolLM2 Q4_1 runs in 4 bits, its Q8_0 embedding in 8); "int8" keeps Q8_0 and rounds the rest.
    A float checkpoint is rounded tensor by tensor as it is read (quantize_tensor), so the float
    model never sits in memory whole; an AWQ or int8 checkpoint is already quantized: as stored."""
    from safetensors import safe_open

    from llmfn.loading import finish_causal_lm, load_causal_lm, resolve
    from llmfn.loading import llama as hf_llama
    from llmfn.loading.checkpoint import weight_files
    from llmfn.loading.config import LLAMA_FAMILY, llama_config_from_hf, read_json
    from llmfn.loading.registry import ALIASES, package_path

    method = normalize_method(quantize)
    dtype = dtype or torch.float32
    name = str(path)
    gguf_file = package_path(ALIASES[name]) if name in ALIASES else Path(path).expanduser()
    if gguf_file.suffix == ".gguf":
        return load_gguf(gguf_file, dtype, device, keep_quantized=True, quantize=method)
    folder = resolve(path)
    raw = read_json(folder / "config.json")
    if raw.get("model_type") not in LLAMA_FAMILY:
        raise UnsupportedModelError(f"{folder}: quantize= supports Llama-family causal LMs ({', '.join(LLAMA_FAMILY)})")
    if raw.get("quantization_config"):
        return load_causal_lm(folder, raw, dtype, device)
    cfg = llama_config_from_hf(raw, folder / "config.json")
    files = weight_files(folder)
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = quantize_tensor(key, f.get_tensor(key), method, group_size)
    params = _unwrap(hf_llama.params_from_hf(tensors, cfg, source=files[0] if len(files) == 1 else folder))
    return finish_causal_lm(folder, raw, cfg, finish_params(params, dtype, device))


_LAYER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|lm_head)\.weight$")


def quantize_tensor(name: str, w: torch.Tensor, method: str, group_size: int = 32):
    """One HF-named tensor as load_quantized stores it: decoder linears in int4 (group_size, when it
    divides the input dim; int8 per channel otherwise) or int8, the embedding and lm_head in per-row
    int8; anything else unchanged. Quantized results are pending leaves for hf_llama.params_from_hf."""
    if w.dim() != 2 or not w.is_floating_point():
        return w
    if _LAYER_LINEAR.search(name):
        if method == "int4" and w.shape[1] % group_size == 0:
            return _Pending(Int4Weight.quantize(w, group_size))
        return _Pending(Int8Weight.quantize(w))
    if _EMBEDDING.search(name):
        return _Pending(Int8Weight.quantize(w))
    return w
