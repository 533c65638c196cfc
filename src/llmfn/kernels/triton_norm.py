"""Triton RMSNorm, optionally fused with the residual add (one program per row).

Matches reference.rms_norm: sum in the input dtype, normalise in fp32, cast to the input
dtype, then multiply by the weight (the HF / Llama order)."""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from llmfn.kernels.triton_common import block


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr,
    stride_x, stride_r, stride_out, stride_sum,
    dim, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / dim + tl.cast(eps, tl.float32))  # inductor passes eps as fp64
    normed = (xf * rstd).to(x.dtype).to(tl.float32)  # round to the input dtype first, like HF
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, normed * w, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., dim] -> [rows, dim] with unit stride along dim (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x, residual, weight, eps):
    dim = x.shape[-1]
    xs = _rows(x)
    rows = xs.shape[0]
    in_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    out = torch.empty(x.shape, dtype=torch.promote_types(in_dtype, weight.dtype), device=x.device)
    summed = torch.empty(x.shape, dtype=in_dtype, device=x.device) if residual is not None else out
    rs = _rows(residual) if residual is not None else xs
    bd = block(dim, 2)
    wrap_triton(_rms_norm_kernel)[(rows,)](
        xs, rs, weight, out, summed,
        xs.stride(0), rs.stride(0), dim, dim,
        dim, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_D=bd,
        num_warps=min(16, max(1, bd // 256)),
    )  # fmt: skip
    return out, summed


@triton_op("llmfn::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim of x [..., dim]; weight [dim]."""
    return _launch(x, None, weight, eps)[0]


@triton_op("llmfn::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton (rms_norm(x + residual), x + residual) in one pass over memory."""
    return _launch(x, residual, weight, eps)
