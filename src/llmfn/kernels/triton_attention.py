"""Triton attention over a position-indexed KV cache: causal, GQA, optional ALiBi and sliding window.

Semantics are reference.attention's: q [b, hq, s, d] at positions q_pos [b, s]; k, v [b, hk, t, d]
hold position j in slot j (or, paged, k, v are pools of blocks [N, hk, S, d] and row b's position j
is in block blocks[b, j // S], slot j % S); key j is visible to a query at position p iff j <= p (and p - j < window).
ALiBi adds slope[h] * (j - p) to the scaled score. A query that sees no key returns zeros.

- prefill (any s): flash-attention style, one program per (block of queries, batch, q head),
  looping over key blocks with an online softmax in the exp2 domain; only the key blocks that
  some query of the block can see are visited.
- decode (s == 1): split-KV. Program (batch, kv head, split) handles all q heads of the GQA group
  (so K/V are read once per group) over one slice of the keys and writes an unnormalised partial
  result; a second kernel merges the splits with their running maxima and sums.
Head dims that are not powers of two (80, 96, ...) are padded to the next power of two and masked.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from llmfn.kernels.reference import KernelError
from llmfn.kernels.triton_common import block, dot_in_fp32, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, qp, slope, k_base, v_base, start, t,
    stride_kt, stride_kd, stride_vt, stride_vd, window,
    offs_n, offs_d, d_mask, qk_scale,
    table_row, kv_block, stride_kblk, stride_vblk,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, PAGED: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax. q [M, D]; qp [M] query positions; slope [M] or unused.
    PAGED: position n is in block table_row[n // kv_block], slot n % kv_block (blocks strided by
    stride_kblk / stride_vblk); else in slot n."""
    n = start + offs_n  # [N]
    n_mask = n < t
    if PAGED:
        blk = tl.load(table_row + n // kv_block, mask=n_mask, other=0).to(tl.int64)
        k_off = blk * stride_kblk + (n % kv_block) * stride_kt
        v_off = blk * stride_vblk + (n % kv_block) * stride_vt
    else:
        k_off = n * stride_kt
        v_off = n * stride_vt
    kt = tl.load(
        k_base + k_off[None, :] + offs_d[:, None] * stride_kd,
        mask=n_mask[None, :] & d_mask[:, None],
        other=0.0,
    )  # [D, N]
    v = tl.load(
        v_base + v_off[:, None] + offs_d[None, :] * stride_vd,
        mask=n_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [N, D]
    if DOT_FP32:
        kt = kt.to(tl.float32)
    scores = tl.dot(q, kt, input_precision="ieee") * qk_scale  # [M, N], log2 domain
    rel = n[None, :] - qp[:, None]  # key position - query position
    if HAS_ALIBI:
        scores += slope[:, None] * rel.to(tl.float32)
    visible = (rel <= 0) & n_mask[None, :]
    if HAS_WINDOW:
        visible = visible & (rel > -window)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, slopes_ptr,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    so_b, so_h, so_s, so_d,
    sp_b, sp_s,
    seq, t, hq, group, head_dim, window, qk_scale,
    table_ptr, st_b, kv_block,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, PAGED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // hq).to(tl.int64)
    h = pid_bh % hq
    kv_h = (h // group).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq
    d_mask = offs_d < head_dim

    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d,
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [M, D]
    if DOT_FP32:
        q = q.to(tl.float32)
    qp = tl.load(pos_ptr + b * sp_b + offs_m * sp_s, mask=m_mask, other=-1).to(tl.int32)  # [M]
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope += tl.load(slopes_ptr + h).to(tl.float32) * 1.4426950408889634

    # Only key blocks some query of this block can see: [lo, hi).
    hi = tl.minimum(tl.max(qp, axis=0) + 1, t)
    lo = 0
    if HAS_WINDOW:
        first = tl.min(tl.where(m_mask, qp, 2147483647), axis=0) - window + 1
        lo = (tl.maximum(first, 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + kv_h * sk_h
    v_base = v_ptr + kv_h * sv_h
    if not PAGED:  # paged: sk_b / sv_b stride blocks, not rows
        k_base += b * sk_b
        v_base += b * sv_b
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, qp, slope, k_base, v_base, start, t,
            sk_t, sk_d, sv_t, sv_d, window, offs_n, offs_d, d_mask, qk_scale,
            table_ptr + b * st_b, kv_block, sk_b, sv_b,
            HAS_ALIBI, HAS_WINDOW, DOT_FP32, PAGED,
        )  # fmt: skip
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :] * so_d,
        out,
        mask=m_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr, pos_ptr, slopes_ptr,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sp_b,
    t, hq, hk, group, head_dim, window, qk_scale, keys_per_split, splits,
    table_ptr, st_b, kv_block,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr, PAGED: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor passes Python floats as fp64
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bk // hk).to(tl.int64)
    kv_h = (pid_bk % hk).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    heads = kv_h * group + offs_g  # the q heads sharing this kv head

    q = tl.load(
        q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [G, D]
    if DOT_FP32:
        q = q.to(tl.float32)
    pos = tl.load(pos_ptr + b * sp_b).to(tl.int32)
    qp = tl.zeros([BLOCK_G], dtype=tl.int32) + pos
    slope = tl.zeros([BLOCK_G], dtype=tl.float32)
    if HAS_ALIBI:
        slope += tl.load(slopes_ptr + heads, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634

    hi = tl.minimum(tl.minimum(pos + 1, t), (split + 1) * keys_per_split)
    lo = split * keys_per_split
    if HAS_WINDOW:
        lo = tl.maximum(lo, (tl.maximum(pos - window + 1, 0) // BLOCK_N) * BLOCK_N)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + kv_h * sk_h
    v_base = v_ptr + kv_h * sv_h
    if not PAGED:  # paged: sk_b / sv_b stride blocks, not rows
        k_base += b * sk_b
        v_base += b * sv_b
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, qp, slope, k_base, v_base, start, t,
            sk_t, sk_d, sv_t, sv_d, window, offs_n, offs_d, d_mask, qk_scale,
            table_ptr + b * st_b, kv_block, sk_b, sv_b,
            HAS_ALIBI, HAS_WINDOW, DOT_FP32, PAGED,
        )  # fmt: skip
    # partials are [b * hq, splits] (+ [BLOCK_D]) contiguous, fp32
    row = (b * hq + heads) * splits + split  # [G]
    tl.store(m_ptr + row, m_i, mask=g_mask)
    tl.store(l_ptr + row, l_i, mask=g_mask)
    tl.store(acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _decode_merge_kernel(
    acc_ptr, m_ptr, l_ptr, o_ptr,
    so_b, so_h, so_d,
    hq, head_dim, splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # b * hq + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < splits
    m = tl.load(m_ptr + pid * splits + offs_s, mask=s_mask, other=float("-inf"))
    sums = tl.load(l_ptr + pid * splits + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(
        acc_ptr + (pid * splits + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )  # [S, D]
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    total = tl.sum(sums * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    b = pid // hq
    h = pid % hq
    tl.store(o_ptr + b * so_b + h * so_h + offs_d * so_d, out, mask=offs_d < head_dim)


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so tests exercise the merge


def decode_splits(batch: int, kv_heads: int, t: int, device: torch.device, block_n: int) -> int:
    """Enough splits of the key axis for (batch * kv_heads * splits) ~ 8 programs per SM: on an H200,
    8 x 8192 keys, 9/3 and 32/8 heads, this was 25-35% faster than 2 per SM (tune_attention.py)."""
    blocks = triton.cdiv(t, block_n)
    want = triton.cdiv(8 * _num_sms(device), batch * kv_heads)
    return max(1, min(blocks, want, 64))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
           blocks: torch.Tensor | None) -> tuple[int, torch.Tensor, int]:
    """Shape checks; returns (keys per row, the block table to pass (q_pos when none), block length)."""
    b, hq, s, d = q.shape
    rows_ok = blocks is None and k.shape[0] == b or blocks is not None and list(blocks.shape[:1]) == [b]
    if not (k.shape == v.shape and rows_ok and k.shape[3] == d and hq % k.shape[1] == 0):
        raise KernelError(f"attention: q {list(q.shape)} vs k {list(k.shape)} / v {list(v.shape)}")
    if list(q_pos.shape) != [b, s]:
        raise KernelError(f"attention: q_pos {list(q_pos.shape)} should be [{b}, {s}]")
    if blocks is None:
        return k.shape[2], q_pos, 1
    if blocks.dim() != 2 or blocks.dtype != torch.int32 or blocks.stride(1) != 1:
        raise KernelError(f"attention: blocks must be int32 [b, nb], got {blocks.dtype} {list(blocks.shape)}")
    return blocks.shape[1] * k.shape[2], blocks, k.shape[2]


def _dot_fp32(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Products in fp32: bf16 under the interpreter (dot_in_fp32), or a cache of another dtype than q
    (a bf16 / fp16 cache under fp32 math: its keys and values are widened on load, exactly)."""
    return dot_in_fp32(q.dtype) or k.dtype != q.dtype


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    window: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launches the flash-attention kernel (any number of queries). Returns [b, hq, s, d].
    Block sizes, warps and stages default to the choice measured in benchmarks/tune_attention.py.
    blocks [b, nb] int32: k, v are pools of blocks [N, hk, S, d] read through it (see reference)."""
    t, table, kv_block = _check(q, k, v, q_pos, blocks)
    bsz, hq, seq, dim = q.shape
    hk = k.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bd = block(dim)
    if interpreting():  # small blocks: tests with small shapes still cross block edges
        block_m, block_n = block_m or 16, block_n or 16
    else:
        # H200, s = 2048 causal (benchmarks/tune_attention.py): 64 x 128 tiles in 2 stages for head
        # dims <= 64 (41 vs 49 us), 64 x 64 in 3 stages for 128 (the best of eight settings).
        block_m = block_m or (16 if seq <= 16 else 64)
        block_n = block_n or (128 if bd <= 64 else 64 if bd <= 128 else 32)
    slopes = alibi_slopes if alibi_slopes is not None else q_pos
    grid = (triton.cdiv(seq, block_m), bsz * hq)
    wrap_triton(_prefill_kernel)[grid](
        q, k, v, out, q_pos, slopes,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *q_pos.stride(),
        seq, t, hq, hq // hk, dim, window or 0, scale * LOG2E, table, table.stride(0), kv_block,
        HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=window is not None, DOT_FP32=_dot_fp32(q, k),
        PAGED=blocks is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd,
        num_warps=num_warps or (4 if bd <= 128 else 8), num_stages=num_stages or (3 if bd == 128 else 2),
    )  # fmt: skip
    return out


def decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    window: int | None = None,
    num_splits: int = 0,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launches split-KV decode for one query per row (q [b, hq, 1, d]). Returns [b, hq, 1, d].
    num_splits = 0 picks enough splits to fill the GPU (decode_splits). blocks: as in prefill."""
    t, table, kv_block = _check(q, k, v, q_pos, blocks)
    bsz, hq, seq, dim = q.shape
    if seq != 1:
        raise KernelError(f"attention decode takes one query per row, got {seq}")
    hk = k.shape[1]
    group = hq // hk
    bd = block(dim)
    block_n = block_n or (16 if interpreting() else 64)
    splits = num_splits or decode_splits(bsz, hk, t, q.device, block_n)
    keys_per_split = triton.cdiv(triton.cdiv(t, splits), block_n) * block_n
    splits = triton.cdiv(t, keys_per_split)  # no empty tail split
    acc = torch.empty((bsz * hq, splits, bd), dtype=torch.float32, device=q.device)
    maxes = torch.empty((bsz * hq, splits), dtype=torch.float32, device=q.device)
    sums = torch.empty((bsz * hq, splits), dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    slopes = alibi_slopes if alibi_slopes is not None else q_pos
    wrap_triton(_decode_split_kernel)[(bsz * hk, splits)](
        q, k, v, acc, maxes, sums, q_pos, slopes,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(), *v.stride(), q_pos.stride(0),
        t, hq, hk, group, dim, window or 0, scale * LOG2E, keys_per_split, splits,
        table, table.stride(0), kv_block,
        HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=window is not None, DOT_FP32=_dot_fp32(q, k),
        PAGED=blocks is not None, BLOCK_G=block(group), BLOCK_N=block_n, BLOCK_D=bd,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    wrap_triton(_decode_merge_kernel)[(bsz * hq,)](
        acc, maxes, sums, out,
        out.stride(0), out.stride(1), out.stride(3),
        hq, dim, splits,
        BLOCK_S=block(splits, 2), BLOCK_D=bd,
        num_warps=4,
    )  # fmt: skip
    return out


@triton_op("llmfn::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, scale: float,
              alibi_slopes: Tensor | None = None, window: int | None = None, blocks: Tensor | None = None) -> Tensor:
    """Triton attention with reference.attention's contract (k, v read through `blocks` when given):
    split-KV decode when s == 1, else prefill."""
    if q.shape[2] == 1:
        return decode(q, k, v, q_pos, scale, alibi_slopes, window, blocks=blocks)
    return prefill(q, k, v, q_pos, scale, alibi_slopes, window, blocks=blocks)
