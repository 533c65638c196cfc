"""Triton int4 weight-only GEMM: out[m, n] = x[m, k] @ w[n, k].T, w dequantized on the fly.

Weight layout: see reference.py ("int4 weight-only quantization"): qweight uint8 [n, k/2] with
q[n, 2i] in the low nibble of byte i, scales and zeros float [n, k/g], w = (q - zeros) * scales.

Each program computes a [BLOCK_M, BLOCK_N] tile, stepping over k by BLOCK_K: it loads
[BLOCK_K/2, BLOCK_N] packed bytes once, splits them into the even-k (low nibble) and odd-k
(high nibble) halves, dequantizes each in fp32, casts to x's dtype (as the reference does) and
accumulates x[:, even k] @ w_even + x[:, odd k] @ w_odd in fp32. When BLOCK_K divides the group
size a tile shares one scale and zero per column. m == 1 (decode) runs the same kernel with a
16-row tile; the weight read dominates there, so the padding costs little.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from llmfn.kernels.reference import check_int4
from llmfn.kernels.triton_common import dot_in_fp32, interpreting


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    m, n, k,
    sx_m, sx_k, sq_n, sq_k, ss_n, ss_g, sz_n, sz_g, so_m, so_n,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_K // 2)  # byte index inside the k step
    m_mask = offs_m < m
    n_mask = offs_n < n
    x_rows = x_ptr + offs_m[:, None] * sx_m
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        byte = k0 // 2 + offs_h  # [H]
        h_mask = byte < k // 2
        x_even = tl.load(
            x_rows + (2 * byte)[None, :] * sx_k, mask=m_mask[:, None] & h_mask[None, :], other=0.0
        )
        x_odd = tl.load(
            x_rows + (2 * byte + 1)[None, :] * sx_k, mask=m_mask[:, None] & h_mask[None, :], other=0.0
        )
        packed = tl.load(
            qw_ptr + offs_n[None, :] * sq_n + byte[:, None] * sq_k,
            mask=h_mask[:, None] & n_mask[None, :],
            other=0,
        )  # [H, N] uint8
        q_even = (packed & 0xF).to(tl.float32)
        q_odd = (packed >> 4).to(tl.float32)
        if GROUP % BLOCK_K == 0:  # one group per k step: a scale and a zero per column
            g = k0 // GROUP
            s = tl.load(s_ptr + offs_n * ss_n + g * ss_g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + offs_n * sz_n + g * sz_g, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            w_even = (q_even - z) * s
            w_odd = (q_odd - z) * s
        else:  # groups change inside the step: gather per element (both nibbles share a group)
            g = (2 * byte // GROUP)[:, None]
            gm = h_mask[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + offs_n[None, :] * ss_n + g * ss_g, mask=gm, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n[None, :] * sz_n + g * sz_g, mask=gm, other=0.0).to(tl.float32)
            w_even = (q_even - z) * s
            w_odd = (q_odd - z) * s
        w_even = w_even.to(x_ptr.dtype.element_ty)  # round like the reference's dequantize
        w_odd = w_odd.to(x_ptr.dtype.element_ty)
        if DOT_FP32:
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            w_even, w_odd = w_even.to(tl.float32), w_odd.to(tl.float32)
        acc += tl.dot(x_even, w_even, input_precision="ieee")
        acc += tl.dot(x_odd, w_odd, input_precision="ieee")
    tl.store(
        out_ptr + offs_m[:, None] * so_m + offs_n[None, :] * so_n, acc, mask=m_mask[:, None] & n_mask[None, :]
    )


@triton_op("llmfn::int4_matmul", mutates_args=())
def int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [..., k] @ int4 weight [n, k] (layout in reference.py) -> [..., n] in x's dtype."""
    check_int4(qweight, scales, zeros, group_size)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if interpreting():
        block_m, block_n = 16, 32
    else:
        block_m, block_n = (16 if m <= 16 else 32 if m <= 32 else 64), 64
    block_k = 64 if group_size % 64 == 0 else 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    wrap_triton(_int4_matmul_kernel)[grid](
        x2, qweight, scales, zeros, out,
        m, n, k,
        *x2.stride(), *qweight.stride(), *scales.stride(), *zeros.stride(), *out.stride(),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_FP32=dot_in_fp32(x.dtype),
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return out.view(*lead, n)
