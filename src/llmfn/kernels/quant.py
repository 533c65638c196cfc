"""Weight-only int4 and int8 weights: the leaf types that `llmfn.kernels.linear` dispatches to where a
params pytree would hold a float [out, in] weight, their packing, and round-to-nearest quantization.
The formats that load into them (AutoAWQ / llmfn int8 checkpoints, GGUF blocks) are read in llmfn.loading.

  Int4Weight   w[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g]       q in 0..15
      qweight  uint8 [n, k // 2]: byte (j, i) holds q[j, 2i] in its low nibble and q[j, 2i + 1] in
               its high nibble (llmfn.kernels.pack_int4: rows are output features, like nn.Linear).
      scales, offsets  float32 [n, k // g], or both float16 where every value is one (GGUF's blocks, an
               AWQ checkpoint's int8 scales): the same values (fp16 -> fp32 is exact; all arithmetic
               stays fp32) in fewer bytes, which decode streams every token (Q4_1: 20 bytes per 32
               weights instead of 24). `compact_scales` picks the dtype.
      An offset instead of a zero point, so every source maps on exactly (bit for bit, because q * s
      is exact in fp32 for fp16 scales and the sum then rounds once, as the source formula does):
        AWQ / GPTQ  w = (q - z) * s     ->  scales = s, offsets = -z * s
        GGUF Q4_0   w = d * (q - 8)     ->  scales = d, offsets = -8 * d
        GGUF Q4_1   w = d * q + m       ->  scales = d, offsets = m
      On CUDA the Triton GEMM of llmfn.kernels takes zero points (w = (q - zeros) * scales); `.to("cuda")`
      adds zeros = -offsets / scales (0 where a scale is 0, i.e. an all-equal block, which then reads 0).
  Int8Weight   w[n, k] = q[n, k] * scales[n, k // g]                            q in -128..127
      qweight  int8 [n, k]; scales float32 (or float16, as above) [n, k // g]; g == k is per output channel (llmfn's RTN
      int8), g == 32 is GGUF Q8_0 (w = d * q).

Both carry `dtype`, the activation dtype: `embedding(ids)` and `dequantize()` return it and
`linear(x)` returns x's dtype. Every method returns new values; leaves are immutable pytree nodes.

int32 nibble packing (AutoAWQ GEMM and GPTQ tensors, see llmfn.loading.awq): eight 4-bit values a
word, nibble i (bits 4i..4i+3) holding column 8c + order[i]; AWQ_ORDER = 0 2 4 6 1 3 5 7.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from llmfn.errors import CheckpointError, LlmfnError
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


def compact_scales(*floats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Scales (and offsets) as float16 when every value of every one is exactly a float16, else float32:
    the same numbers either way, in the fewest bytes."""
    floats = tuple(t.float().contiguous() for t in floats)
    halves = tuple(t.half() for t in floats)
    if all(torch.equal(h.float(), t) for h, t in zip(halves, floats, strict=True)):
        return halves
    return floats


def _cpu_ready(q: torch.Tensor, *floats: torch.Tensor) -> bool:
    """Leaves the C kernels read as they are: CPU, contiguous, scales / offsets all fp32 or all fp16."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in (q, *floats)) and (
        len({t.dtype for t in floats}) == 1 and floats[0].dtype in (torch.float32, torch.float16)
    )


def _cpu_kernels(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and cpu_quant.available()


@dataclass(frozen=True, eq=False)
class Int4Weight:
    qweight: torch.Tensor  # uint8 [n, k/2]
    scales: torch.Tensor  # fp32 or fp16 [n, k/g]
    offsets: torch.Tensor  # as scales [n, k/g]
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
        """(kind, qweight, scales, offsets, group, half) for the fused C decoder layer (kernels/cpu.py;
        kind 1: fp32 activations, 3: int8 ones, as cpu_quant.int8_activations says; half: fp16 scales),
        or None when its int4 kernel cannot take this weight."""
        ok = _cpu_ready(self.qweight, self.scales, self.offsets) and cpu_quant.int4_ok(self.shape[1], self.group_size)
        if not ok:
            return None
        kind = 3 if cpu_quant.int8_activations() else 1
        return (kind, self.qweight.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(), self.group_size,
                int(cpu_quant.half(self.scales)))

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
        if device.type != "cuda":
            return Int4Weight(mv(self.qweight), mv(self.scales), mv(self.offsets), self.group_size, dtype or self.dtype)
        _, scales, zeros = self.kernel_layout()  # the Triton GEMM takes fp32 scales and zero points
        return Int4Weight(mv(self.qweight), mv(scales), mv(self.offsets.float()), self.group_size, dtype or self.dtype,
                          mv(zeros))

    def kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros) in llmfn.kernels' int4 layout (w = (q - zeros) * scales), fp32."""
        scales, offsets = self.scales.float(), self.offsets.float()
        zeros = torch.where(scales != 0, -offsets / scales, torch.zeros_like(scales))
        return self.qweight, scales, zeros

    @classmethod
    def from_q(cls, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> Int4Weight:
        """From unpacked q [n, k] (0..15) and float scales / offsets [n, k/g]."""
        n, k = q.shape
        _check_groups(k, group_size, "int4")
        if tuple(scales.shape) != (n, k // group_size) or tuple(offsets.shape) != (n, k // group_size):
            raise CheckpointError(f"int4 scales/offsets must be [{n}, {k // group_size}]")
        return cls(pack_int4(q).contiguous(), *compact_scales(scales, offsets), group_size)

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
    scales: torch.Tensor  # fp32 or fp16 [n, k/g]
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
        """(kind, qweight, scales, 0, group, half) for the fused C decoder layer (kernels/cpu.py; kind
        2: fp32 activations, 4: int8 ones, as cpu_quant.int4_linear chooses; half: fp16 scales), or None
        when its int8 kernel cannot take this weight."""
        k, g = self.shape[1], self.group_size
        if not (_cpu_ready(self.qweight, self.scales) and cpu_quant.int8_ok(k, g)):
            return None
        kind = 4 if cpu_quant.int8_activations() and cpu_quant.int8_act8_ok(k, g) else 2
        return (kind, self.qweight.data_ptr(), self.scales.data_ptr(), 0, g, int(cpu_quant.half(self.scales)))

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
        return cls(q.to(torch.int8).contiguous(), *compact_scales(scales), group_size)

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
    if len({w.scales.dtype for w in weights}) > 1:  # fp16 and fp32 scales: all fp32, the same values
        weights = [replace(w, scales=w.scales.float(), **({"offsets": w.offsets.float()}
                                                          if isinstance(w, Int4Weight) else {})) for w in weights]
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
    serialized_type_name="llmfn.kernels.quant.Int4Weight",
)
pytree.register_pytree_node(
    Int8Weight,
    lambda w: ([w.qweight, w.scales], (w.group_size, w.dtype)),
    lambda children, ctx: Int8Weight(*children, ctx[0], ctx[1]),
    serialized_type_name="llmfn.kernels.quant.Int8Weight",
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


__all__ = [
    "AWQ_ORDER", "PLAIN_ORDER", "Int4Weight", "Int8Weight", "QuantizedWeight", "cat_out", "is_quantized",
    "pack_awq", "pack_int4", "pack_int32", "rtn_int4", "rtn_int8", "unpack_awq", "unpack_int4", "unpack_int32",
]  # fmt: skip
