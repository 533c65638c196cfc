"""Public ops: the torch reference on CPU (inlined and fused by torch.compile), Triton on CUDA."""

import torch

from llmfn.kernels import reference as ref


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return ref.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.add_rms_norm(x, residual, weight, eps)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.apply_rope(q, k, cos, sin)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    return ref.attention(q, k, v, q_pos, scale, alibi_slopes, window)
