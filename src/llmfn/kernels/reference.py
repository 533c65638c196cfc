"""Pure-torch reference ops: the CPU path and the oracle for every Triton kernel."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from llmfn.errors import LlmfnError


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


def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, scale: float,
              alibi_slopes: Tensor | None = None, window: int | None = None) -> Tensor:
    """Causal attention over a position-indexed KV cache, with GQA and optional ALiBi.

    q: [b, hq, s, d] at positions q_pos: [b, s]; k, v: [b, hk, t, d] holding position j
    in slot j (a cache of another float dtype, e.g. bf16 under fp32 math, is widened to q's). Returns
    [b, hq, s, d]."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    mask = visible_keys(q_pos, k.shape[2], window)[:, None]  # [b, 1, s, t]
    if alibi_slopes is not None:
        k_pos = torch.arange(k.shape[2], device=q.device)
        dist = (k_pos[None, None, :] - q_pos[:, :, None]).float()  # [b, s, t]
        bias = alibi_slopes.float()[None, :, None, None] * dist[:, None]  # [b, h, s, t]
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def qkv_attention(qkv, cos, sin, q_scale, positions, k_cache, v_cache, num_heads, num_kv_heads, scale,
                  alibi_slopes=None, window=None, rope=apply_rope, attend=attention, blocks=None) -> torch.Tensor:
    """Split the fused projection qkv [b, t, (hq + 2hk) * hd], rotate q and k (cos/sin None: no rope),
    scale q by q_scale [b, t, 1, 1] (None: none), write k and v into the caches in place at positions
    [b, t], and attend -> [b, t, hq * hd]. rope / attend: the ops to use. The caches are blocks
    [N, hk, S, hd]: without a table block b is row b's cache (N == b); with blocks [b, nb] row b's
    position p is in block blocks[b, p // S], slot p % S, and attention reads the row's blocks in order.
    A cache of a narrower dtype (bf16 / fp16 under fp32 math) stores k and v rounded to nearest even
    (`Tensor.to`), and attention reads them widened: rounded once, when written."""
    b, t, _ = qkv.shape
    hd = k_cache.shape[-1]
    q, k, v = qkv.split((num_heads * hd, num_kv_heads * hd, num_kv_heads * hd), dim=-1)
    q = q.view(b, t, num_heads, hd)
    k = k.view(b, t, num_kv_heads, hd)
    v = v.view(b, t, num_kv_heads, hd)
    if cos is not None:
        q, k = rope(q, k, cos, sin)
    if q_scale is not None:
        q = q * q_scale.to(q.dtype)
    if blocks is None:
        where = (torch.arange(b, device=qkv.device)[:, None], positions)  # [b, 1], [b, t]
    else:
        s = k_cache.shape[2]
        where = (blocks.long().gather(1, positions // s), positions % s)  # block, slot: [b, t] each
    k_cache[where[0], :, where[1]] = k.to(k_cache.dtype)  # writes [b, t, hk, hd]
    v_cache[where[0], :, where[1]] = v.to(v_cache.dtype)
    q = q.transpose(1, 2)  # [b, hq, t, hd]
    if blocks is None:
        out = attend(q, k_cache, v_cache, positions, scale, alibi_slopes, window)
    elif getattr(attend, "paged", False):  # it reads the blocks in place
        out = attend(q, k_cache, v_cache, positions, scale, alibi_slopes, window, blocks)
    else:
        out = attend(q, gather_blocks(k_cache, blocks), gather_blocks(v_cache, blocks), positions, scale,
                     alibi_slopes, window)  # fmt: skip
    return out.transpose(1, 2).reshape(b, t, num_heads * hd)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """A block cache [N, hk, S, hd] read through blocks [b, nb] -> each row's cache [b, hk, nb * S, hd]."""
    b, nb = blocks.shape
    _, hk, s, hd = cache.shape
    return cache[blocks.long()].transpose(1, 2).reshape(b, hk, nb * s, hd)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2f] = cat(gate, up)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------
# int4 weight-only quantization
#
# Layout (the one every int4 path in llmfn uses; AWQ / GGUF Q4_0 / Q4_1 are converted to it at load):
#   w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]          g = group_size
#   qweight: uint8 [n, k // 2]; byte (n, i) holds q[n, 2i] in its low nibble and q[n, 2i + 1] in
#            its high nibble (q unsigned, 0..15). Rows are output features, like nn.Linear.weight.
#   scales:  float [n, k // g] (fp16 / bf16 / fp32, usually the activation dtype).
#   zeros:   float [n, k // g], same dtype as scales. Floats, so every format maps on exactly:
#            AWQ / GPTQ: zeros = z (the unpacked 4-bit zero point); GGUF Q4_0 (w = d * (q - 8)):
#            scales = d, zeros = 8; GGUF Q4_1 (w = d * q + m): scales = d, zeros = -m / d
#            (store fp32 zeros for Q4_1 to keep -m / d exact enough; a block with d == 0 is all m).
#   k must be a multiple of group_size, and group_size even.
# ---------------------------------------------------------------------------------------------


class KernelError(LlmfnError, ValueError):
    """A tensor handed to a kernel has the wrong shape, dtype or layout."""


def check_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    """Raises KernelError unless (qweight, scales, zeros) follow the int4 layout above."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise KernelError(f"int4 qweight must be uint8 [n, k/2], got {qweight.dtype} {list(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if group_size <= 0 or group_size % 2 or k % group_size:
        raise KernelError(f"int4 group_size {group_size} must be even and divide k={k}")
    want = [n, k // group_size]
    for name, t in (("scales", scales), ("zeros", zeros)):
        if list(t.shape) != want or not t.is_floating_point():
            raise KernelError(f"int4 {name} must be float {want}, got {t.dtype} {list(t.shape)}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[n, k] integers in 0..15 -> uint8 [n, k // 2] (even k in the low nibble)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k // 2] -> uint8 [n, k] values 0..15 (inverse of pack_int4)."""
    lo = qweight & 0xF
    hi = qweight >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)  # [n, k/2, 2] -> [n, k]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest int4 quantization of w [n, k] -> (qweight, scales, zeros)
    in w's dtype. Integer zero points, as AWQ stores them."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    lo = wg.amin(-1).clamp(max=0.0)
    hi = wg.amax(-1).clamp(min=0.0)
    scales = ((hi - lo) / 15).clamp(min=1e-8)  # [n, k/g]
    zeros = (-lo / scales).round().clamp(0, 15)
    q = (wg / scales[..., None] + zeros[..., None]).round().clamp(0, 15)
    return pack_int4(q.reshape(n, k)), scales.to(w.dtype), zeros.to(w.dtype)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The int4 layout above -> dense [n, k] weight in dtype (computed in fp32, then cast)."""
    q = unpack_int4(qweight).float()  # [n, k]
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(n, k).to(dtype)


def int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [..., k] @ dequantized(w).T -> [..., n]: dequantize to x's dtype, then a dense matmul."""
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype))


int4_matmul_reference = int4_matmul
