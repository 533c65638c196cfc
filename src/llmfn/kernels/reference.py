"""Pure-torch reference ops: the CPU path and the oracle for every Triton kernel."""

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back, then scaled (the Llama / HF order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, half-split layout (rotate_half). cos/sin: [b, s, d/2]."""
    cos = cos.unsqueeze(2).to(q.dtype)  # [b, s, 1, d/2]
    sin = sin.unsqueeze(2).to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotate(q), rotate(k)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes for any head count (Press et al.; BLOOM's build_alibi_tensor)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def visible_keys(q_pos: torch.Tensor, k_len: int, window: int | None = None) -> torch.Tensor:
    """Causal mask [b, s, t]: key slot j is visible to a query at position p iff j <= p
    (and p - j < window with a sliding window). The cache holds position p in slot p."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask = mask & (k_pos[None, None, :] > q_pos[:, :, None] - window)
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention over a position-indexed KV cache, with GQA and optional ALiBi.

    q: [b, hq, s, d] at positions q_pos: [b, s]; k, v: [b, hk, t, d] holding position j
    in slot j. Returns [b, hq, s, d]."""
    mask = visible_keys(q_pos, k.shape[2], window)[:, None]  # [b, 1, s, t]
    if alibi_slopes is not None:
        k_pos = torch.arange(k.shape[2], device=q.device)
        dist = (k_pos[None, None, :] - q_pos[:, :, None]).float()  # [b, s, t]
        bias = alibi_slopes.float()[None, :, None, None] * dist[:, None]  # [b, h, s, t]
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
