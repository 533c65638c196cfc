"""Encoder attention in C on CPU (fp32): every query attends to every unmasked key of its sequence,
read straight from the fused qkv projection and written straight into [B, T, H * hd].

Why: at BERT's head size (32) torch's CPU flash-attention kernel runs at ~40 GFLOP/s on this
project's 2-core AVX2 machine, and the permutes around it copy q, k, v and the output once more.
Here one task is one (sequence, head): its keys (transposed) and values are copied into 16-column
panels that stay in L1/L2, then each block of 6 queries takes its scores with a 6 x 16 register
tile, a softmax (vectorised exp) and the values with the same tile; on AVX-512 12 queries x 32
keys or value columns (on one Xeon core, 32 x 200 tokens: 24 ms, AVX2 tile 33, torch's SDPA 32).

`attention_block` runs a post-LN encoder layer's whole attention half for a few sequences per task (the
GEMM of kernels/cpu_gemm.py is compiled into this library): projection, attention, output projection,
residual and LayerNorm, the sequences' [rows, 3D] projection kept in the thread's cache. MiniLM, 32 x 200
tokens: 61 ms a layer instead of the three calls' 66 (`make bench-kernels`), the same bits.
`packed_attention_block` runs it on sequences packed without their padding (BERT batches of short
sentences are ~16% padding), each real row bitwise what the padded block gives it.

Semantics are `F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])` (no
causal mask): a query whose keys are all masked gets zeros, as torch's CPU kernel gives. The C code
trusts its shapes: `attention` checks them first.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmfn import cbuild
from llmfn.kernels import cpu_gemm
from llmfn.kernels.cpu import check_shapes, ptr

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "llmfn_encoder_attention": [_p, _p, _p, _i64, _i64, _i64, _i64, _f32, _i32],
    "llmfn_encoder_attention_block": [_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _f32, _p, _p, _f32,
                                      _i32],
    "llmfn_encoder_attention_block_packed": [_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _f32, _p, _p,
                                             _f32, _i32],
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (csrc/attention.c, the GEMM's code compiled in: attention_block runs its
    products around the attention; built on first use by llmfn.cbuild), or None: no C compiler, or
    LLMFN_CPU_KERNELS=torch."""
    return cbuild.cpu_kernels("llmfn_attention", "attention.c", _SIGNATURES, defines=cpu_gemm.DEFINES)


def available() -> bool:
    return library() is not None


def attention(qkv: torch.Tensor, n_heads: int, key_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """qkv [B, T, 3 * H * hd] (q, k, v thirds, heads in order) -> attention output [B, T, H * hd].
    key_mask [B, T] bool (True = attend) or None; scale defaults to 1 / sqrt(hd)."""
    B, T, three_d = qkv.shape
    d = three_d // 3
    hd = d // n_heads
    ok = three_d == 3 * d and d == n_heads * hd and (key_mask is None or tuple(key_mask.shape) == (B, T))
    check_shapes(ok, "attention", qkv, key_mask, detail=f"{n_heads} heads")
    qkv = qkv.contiguous()
    mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
    out = qkv.new_empty(B, T, d)
    if out.numel() == 0:
        return out
    scale = hd**-0.5 if scale is None else scale
    status = library().llmfn_encoder_attention(
        qkv.data_ptr(), ptr(mask), out.data_ptr(), B, T, n_heads, hd, scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("attention: cannot allocate scratch memory")
    return out


def attention_block(x: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None, wo: torch.Tensor,
                    bo: torch.Tensor | None, n_heads: int, key_mask: torch.Tensor | None = None,
                    norm: tuple | None = None, scale: float | None = None, group: int = 1) -> torch.Tensor:
    """norm(attention(x @ wqkv.T + bqkv) @ wo.T + bo + x) for x [B, T, D], wqkv [3D, D] and wo [D, D] given
    as cpu_gemm.pack(w): a post-LN encoder layer's attention half, `group` sequences per task, bitwise
    equal to cpu_gemm.linear, `attention` and cpu_gemm.linear in turn. Parallel over tasks: for
    batches of at least a few tasks per thread."""
    B, T, D = x.shape
    hd = D // max(n_heads, 1)
    ln_w, ln_b, eps = norm if norm is not None else (None, None, 0.0)
    ok = n_heads > 0 and D == n_heads * hd and wqkv.numel() == D * -(-3 * D // cpu_gemm.NR) * cpu_gemm.NR
    ok = ok and wo.numel() == D * -(-D // cpu_gemm.NR) * cpu_gemm.NR and (key_mask is None or tuple(key_mask.shape) == (B, T))
    ok = ok and all(t is None or tuple(t.shape) == (n,) for t, n in ((bqkv, 3 * D), (bo, D), (ln_w, D), (ln_b, D)))
    check_shapes(ok, "attention_block", x, wqkv, bqkv, wo, bo, key_mask, ln_w, ln_b, detail=f"{n_heads} heads")
    x = x.contiguous()
    mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
    y = torch.empty_like(x)
    bqkv, bo, ln_w, ln_b = (None if t is None else t.contiguous() for t in (bqkv, bo, ln_w, ln_b))
    status = library().llmfn_encoder_attention_block(
        x.data_ptr(), wqkv.data_ptr(), ptr(bqkv), wo.data_ptr(), ptr(bo), ptr(mask), y.data_ptr(), B, T, n_heads, hd,
        group, hd**-0.5 if scale is None else scale, ptr(ln_w), ptr(ln_b), eps, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("attention_block: cannot allocate scratch memory")
    return y


def packed_attention_block(x: torch.Tensor, starts: torch.Tensor, longest: int, wqkv: torch.Tensor,
                           bqkv: torch.Tensor | None, wo: torch.Tensor, bo: torch.Tensor | None, n_heads: int,
                           norm: tuple | None = None, scale: float | None = None, group: int = 1) -> torch.Tensor:
    """attention_block for sequences packed without padding: x [N, D], sequence s in rows starts[s] ..
    starts[s + 1] - 1 (starts: int64 [B + 1], from 0 to N), none longer than `longest`; each attends to
    its own rows. No padding row is projected or attended."""
    N, D = x.shape
    B = starts.numel() - 1
    hd = D // max(n_heads, 1)
    ln_w, ln_b, eps = norm if norm is not None else (None, None, 0.0)
    lengths = starts[1:] - starts[:-1] if B > 0 else starts[:0]
    ok = n_heads > 0 and D == n_heads * hd and B >= 0 and starts.dtype == torch.int64 and int(starts[0]) == 0
    ok = ok and int(starts[-1]) == N and bool((lengths >= 0).all()) and bool((lengths <= longest).all())
    ok = ok and wqkv.numel() == D * -(-3 * D // cpu_gemm.NR) * cpu_gemm.NR and wo.numel() == D * -(-D // cpu_gemm.NR) * cpu_gemm.NR
    ok = ok and all(t is None or tuple(t.shape) == (n,) for t, n in ((bqkv, 3 * D), (bo, D), (ln_w, D), (ln_b, D)))
    check_shapes(ok, "packed_attention_block", x, starts, wqkv, bqkv, wo, bo, ln_w, ln_b, detail=f"{n_heads} heads")
    x, starts = x.contiguous(), starts.contiguous()
    y = torch.empty_like(x)
    bqkv, bo, ln_w, ln_b = (None if t is None else t.contiguous() for t in (bqkv, bo, ln_w, ln_b))
    status = library().llmfn_encoder_attention_block_packed(
        x.data_ptr(), wqkv.data_ptr(), ptr(bqkv), wo.data_ptr(), ptr(bo), starts.data_ptr(), y.data_ptr(), B,
        max(longest, 1), n_heads, hd, group, hd**-0.5 if scale is None else scale, ptr(ln_w), ptr(ln_b), eps,
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("packed_attention_block: cannot allocate scratch memory")
    return y
