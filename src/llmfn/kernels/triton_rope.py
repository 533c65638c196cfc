"""Triton rotary embedding, half-split layout (rotate_half), applied to q and k in place.

One program per token rotates every q head and every k head of that token (Liger-Kernel's
layout), computing in fp32 and storing in the input dtype."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from llmfn.kernels.triton_common import block


@triton.jit
def _rotate_heads(base, stride_h, stride_d, heads, cos, sin, offs_d, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < heads)[:, None] & d_mask[None, :]
    p1 = base + offs_h[:, None] * stride_h + offs_d[None, :] * stride_d  # [BLOCK_H, BLOCK_HALF]
    p2 = p1 + HALF * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, x1 * cos[None, :] - x2 * sin[None, :], mask=mask)
    tl.store(p2, x2 * cos[None, :] + x1 * sin[None, :], mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr,
    sq_b, sq_s, sq_h, sq_d,
    sk_b, sk_s, sk_h, sk_d,
    sc_b, sc_s, sc_d,
    ss_b, ss_s, ss_d,
    seq, hq, hk,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // seq).to(tl.int64)
    s = (pid % seq).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + b * sc_b + s * sc_s + offs_d * sc_d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * ss_b + s * ss_s + offs_d * ss_d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * sq_b + s * sq_s, sq_h, sq_d, hq, cos, sin, offs_d, d_mask, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + b * sk_b + s * sk_s, sk_h, sk_d, hk, cos, sin, offs_d, d_mask, HALF, BLOCK_HK)


@triton_op("llmfn::rope_", mutates_args={"q", "k"})
def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates q [b, s, hq, d] and k [b, s, hk, d] in place by cos/sin [b, s, d/2].

    q and k are donated: they are overwritten (any strides, e.g. views into a fused qkv)."""
    bsz, seq, hq, dim = q.shape
    half = dim // 2
    wrap_triton(_rope_kernel)[(bsz * seq,)](
        q, k, cos, sin,
        *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
        seq, hq, k.shape[2],
        HALF=half, BLOCK_HALF=block(half, 2), BLOCK_HQ=block(hq, 2), BLOCK_HK=block(k.shape[2], 2),
    )  # fmt: skip
