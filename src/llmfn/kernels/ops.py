"""Public ops: Triton on CUDA; on CPU the C kernels (kernels/cpu.py) for fp32 decode-sized inputs,
else the torch reference (inlined and fused by torch.compile).

The Triton paths are `torch.library.triton_op`s (torch.ops.llmfn.*), so torch.compile on CUDA
traces through them without graph breaks. Tests force them on CPU tensors under
TRITON_INTERPRET=1 by calling the triton_* modules directly."""

import torch
import torch.nn.functional as F
from torch import Tensor

from llmfn.kernels import cpu, cpu_attention
from llmfn.kernels import reference as ref
from llmfn.kernels.reference import visible_keys

# Importing the Triton paths pulls in triton and torch._inductor (seconds), so CPU-only machines
# skip it; without triton every device takes the reference.
triton_attention = triton_int4 = triton_norm = triton_rope = None
if torch.cuda.is_available():
    try:
        from llmfn.kernels import triton_attention, triton_int4, triton_norm, triton_rope
    except ImportError:  # pragma: no cover - depends on the install
        pass


def _triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_norm is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 math, HF order). x [..., dim], weight [dim]."""
    if _triton(x):
        return triton_norm.rms_norm(x, weight, eps)
    if cpu.takes(x, weight, max_rows=None):  # one pass per row instead of five torch ops
        return cpu.rms_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2f] = cat(gate, up) along the last dim -> [..., f]."""
    if cpu.takes(gate_up, max_rows=None):
        return cpu.silu_mul(gate_up)
    return ref.silu_mul(gate_up)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), fused into one pass on CUDA."""
    if _triton(x):
        return triton_norm.add_rms_norm(x, residual, weight, eps)
    return ref.add_rms_norm(x, residual, weight, eps)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (half-split layout) of q [b, s, hq, d] and k [b, s, hk, d] by cos/sin [b, s, d/2].

    q and k are donated: on CUDA they are rotated in place and returned; on CPU new tensors are
    returned. Callers must use the returned tensors and not the arguments afterwards."""
    if _triton(q):
        triton_rope.rope_(q, k, cos, sin)
        return q, k
    return ref.apply_rope(q, k, cos, sin)


def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, scale: float,
              alibi_slopes: Tensor | None = None, window: int | None = None, blocks: Tensor | None = None) -> Tensor:
    """Causal GQA attention over a position-indexed KV cache (see reference.attention), or over pools of
    blocks read through `blocks` (see reference.qkv_attention). On CUDA: flash-attention prefill, or
    split-KV decode when s == 1, both reading the blocks in place; elsewhere the blocks are gathered.
    A cache of a narrower float dtype than q (bf16 / fp16 under fp32 math) is read widened to q's."""
    if _triton(q):
        return triton_attention.attention(q, k, v, q_pos, scale, alibi_slopes, window, blocks)
    if blocks is not None:
        k, v = ref.gather_blocks(k, blocks), ref.gather_blocks(v, blocks)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        return _cpu_attention(q, k, v, q_pos, scale, alibi_slopes, window)
    return ref.attention(q, k, v, q_pos, scale, alibi_slopes, window)


def _cpu_attention(q, k, v, q_pos, scale, alibi_slopes, window):
    """The reference over the slots some query can see (reading q_pos costs no device sync on CPU):
    slots past the last position are masked for every query, and a prompt prefilled from position 0
    takes SDPA's causal kernel, which skips the masked half instead of computing it (SmolLM2's
    128-token prefill: 22 -> 6 ms of attention)."""
    used = int(q_pos.max()) + 1
    k, v = k[:, :, :used].to(q.dtype), v[:, :, :used].to(q.dtype)
    t = q.shape[2]
    if alibi_slopes is None and window is None and used == t and bool((q_pos == torch.arange(t)).all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return ref.attention(q, k, v, q_pos, scale, alibi_slopes, window)


def batch_invariant_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, scale: float,
                              alibi_slopes: Tensor | None = None, window: int | None = None,
                              blocks: Tensor | None = None) -> Tensor:
    """kernels.attention (same arguments and result) computed so that a row's result does not depend
    on its place in the batch. q: [b, hq, t, d] at q_pos [b, t]; k, v: [b, hk, s, d].

    On CPU: two batched matmuls per kv head group (the hq / hk query heads that share a kv head are
    the rows of one product, so GQA needs no repeated keys) around an fp32 softmax. On CUDA: the
    Triton kernels, whose split of the keys depends only on s."""
    if q.is_cuda:
        return attention(q, k, v, q_pos, scale, alibi_slopes, window, blocks)
    if blocks is not None:
        k, v = ref.gather_blocks(k, blocks), ref.gather_blocks(v, blocks)
    k, v = k.to(q.dtype), v.to(q.dtype)  # a 16-bit cache under fp32 math: widened (exact)
    b, hq, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    g = hq // hk
    scores = torch.matmul(q.reshape(b, hk, g * t, d), k.transpose(-1, -2))  # [b, hk, g*t, s]
    scores = scores.view(b, hk, g, t, s).float() * scale
    if alibi_slopes is not None:
        dist = (torch.arange(s, device=q.device)[None, None, :] - q_pos[:, :, None]).float()  # [b, t, s]
        scores = scores + alibi_slopes.float().view(1, hk, g, 1, 1) * dist[:, None, None]
    visible = visible_keys(q_pos, s, window)[:, None, None]  # [b, 1, 1, t, s]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(v.dtype)
    out = torch.matmul(probs.view(b, hk, g * t, s), v)  # [b, hk, g*t, d]
    return out.view(b, hq, t, d)


batch_invariant_attention.batch_invariant = True  # llmfn's CPU C kernels, batch-invariant too, may stand in
attention.paged = batch_invariant_attention.paged = True  # take `blocks` (reference.qkv_attention passes it)


def encoder_attention(qkv: torch.Tensor, n_heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional attention over a fused projection qkv [B, T, 3D] (q, k, v heads in turn) ->
    [B, T, D], padded keys (key_mask [B, T] bool, False) masked out: llmfn's C kernel for fp32 CPU
    inputs (it reads q, k, v in place, no permute copies), else SDPA."""
    B, T, D3 = qkv.shape
    if cpu.takes(qkv, max_rows=None) and cpu_attention.available():
        return cpu_attention.attention(qkv, n_heads, key_mask)
    q, k, v = qkv.view(B, T, 3, n_heads, D3 // 3 // n_heads).permute(2, 0, 3, 1, 4)  # each [B, H, T, hd]
    mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T], True = attend
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, hd]
    return a.transpose(1, 2).reshape(B, T, D3 // 3)


def int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [..., k] @ int4 weight [n, k] -> [..., n]; the layout is documented in reference.py."""
    if _triton(x):
        return triton_int4.int4_matmul(x, qweight, scales, zeros, group_size)
    return ref.int4_matmul(x, qweight, scales, zeros, group_size)


def qkv_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_scale: torch.Tensor | None,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    window: int | None = None,
    attention_op=None,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """A layer's attention from its fused projection qkv [b, t, (hq + 2hk) * hd] -> [b, t, hq * hd].

    Rotates q and k by cos/sin [b, t, hd/2] (None: no rope), scales q by q_scale [b, t, 1, 1]
    (None: none), writes k and v into the caches at positions [b, t] (the caches are donated: written
    in place), then attends causally (`attention_op`, default `attention` above). The caches are
    blocks [N, hk, S, hd] read through `blocks` [b, nb] (int32; None: one block per row, N == b), as
    reference.qkv_attention describes.
    fp32 CPU decode steps and prompt chunks (kernels/cpu.py takes_qkv_attention) take one C kernel for
    all of it. It is batch-invariant, so it also stands in for an `attention_op` that only asks for
    that (`batch_invariant = True` on the op, as the engine's has); any other op given is called as
    is."""
    if (
        (attention_op is None or getattr(attention_op, "batch_invariant", False))
        and positions.dtype == torch.int64
        and cpu.cache_layout_ok(k_cache, v_cache)
        and cpu.takes_qkv_attention(qkv, *(x for x in (cos, sin) if x is not None))
    ):
        return cpu.qkv_attention(qkv, cos, sin, q_scale, positions, k_cache, v_cache, num_heads, num_kv_heads,
                                 scale, alibi_slopes, window, blocks)
    return ref.qkv_attention(qkv, cos, sin, q_scale, positions, k_cache, v_cache, num_heads, num_kv_heads, scale,
                             alibi_slopes, window, rope=apply_rope, attend=attention_op or attention, blocks=blocks)
