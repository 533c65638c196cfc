"""The one matmul and the one embedding lookup every model calls.

A weight is a plain tensor [out, in], a PackedWeight (below) or a quantized leaf (llmfn.kernels.quant) that
implements `linear(x)` and `embedding(ids)`; model code never branches on the weight's kind.

fp32 CPU matmuls take the fastest path measured: llmfn's C matrix-vector kernel up to
kernels.cpu.MAX_ROWS rows (decode: it streams the weight at ~27 GB/s on the AVX2 EPYC, MKL ~18),
except that a PackedWeight takes llmfn's C GEMM from GEMM_MIN_ROWS rows on (kernels/cpu_gemm.py:
1.10-1.31x oneDNN at MiniLM's shapes on the EPYC, 0.8-1.1x on one Xeon core; bias, GELU, residual
and LayerNorm fused); above MAX_ROWS a plain weight takes oneDNN's linear (prefill: 8% faster than
MKL's sgemm end to end, SmolLM2's 128-token prompt 459 -> 495 tok/s). On each path a
row's result does not depend on its batch, as the engine needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmfn.kernels import cpu, cpu_attention, cpu_gemm
from llmfn.kernels.ops import encoder_attention

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A dense fp32 CPU weight [n, k] beside its copy in the C GEMM's panel layout, made once at load
    by `pack` so that matmuls of many rows do not repack it per call. `w` serves every other path
    (decode rows, torch.compile, autograd), so it behaves exactly like the plain tensor."""

    w: torch.Tensor  # [n, k]
    packed: torch.Tensor  # cpu_gemm.pack(w)

    @property
    def shape(self) -> torch.Size:
        return self.w.shape

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    def numel(self) -> int:
        return self.w.numel()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """The weight moved / cast; packed again only where the C GEMM can use it."""
        return pack(self.w.to(device=device, dtype=dtype))


def pack(w):
    """w as a PackedWeight when it is a 2-D fp32 CPU tensor and the C GEMM builds here, else w."""
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.numel() and cpu.fp32_cpu(w) and cpu_gemm.available():
        return PackedWeight(w, cpu_gemm.pack(w))
    return w


def _finish(y: torch.Tensor, act: str | None, residual: torch.Tensor | None, norm: tuple | None) -> torch.Tensor:
    if act is not None:
        y = ACTIVATIONS[act](y)
    if residual is not None:
        y = y + residual
    return y if norm is None else F.layer_norm(y, y.shape[-1:], norm[0], norm[1], norm[2])


# Fewest rows for which a PackedWeight's matmul takes the C GEMM rather than the decode kernel: MiniLM's
# four matmuls of a layer, one Xeon core, AVX-512: 12 rows 0.38 ms instead of 0.82, 4 rows 0.39 / 0.39,
# 2 rows 0.36 / 0.29 (the decode kernel streams the weight once for all rows, but its per-row work
# does not reuse registers as the GEMM's 12 x 32 tile does).
GEMM_MIN_ROWS = 4


def gemm_takes(x: torch.Tensor, *operands: torch.Tensor | None) -> bool:
    """Whether llmfn's C GEMM serves x: fp32 CPU, at least GEMM_MIN_ROWS rows, k > 0."""
    k = x.shape[-1]
    if k == 0 or x.numel() < GEMM_MIN_ROWS * k or not cpu.fp32_cpu(x, *(t for t in operands if t is not None)):
        return False
    return not torch.compiler.is_compiling()


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None, *, act: str | None = None,
           residual: torch.Tensor | None = None, norm: tuple | None = None) -> torch.Tensor:
    """norm(act(x @ w.T + b) + residual). x: [..., in]; w: [out, in], a PackedWeight or a quantized
    leaf; act: None or a key of ACTIVATIONS; residual: [..., out] or None; norm: None or a LayerNorm
    over the outputs, (weight [out], bias [out], eps) (post-LN blocks such as BERT's)."""
    if isinstance(w, PackedWeight):
        if gemm_takes(x, w.w, b, residual, *(norm[:2] if norm else ())):
            if act in cpu_gemm.ACTS:
                return cpu_gemm.linear(x, w.packed, w.shape[0], b, act, residual, norm)
            return _finish(cpu_gemm.linear(x, w.packed, w.shape[0], b), act, residual, norm)
        w = w.w
    if isinstance(w, torch.Tensor):
        operands = (w,) if b is None else (w, b)
        if w.is_contiguous() and cpu.takes(x, *operands):
            y = cpu.linear(x, w, b)
        else:
            y = cpu.dense_linear(x, w, b)
        return _finish(y, act, residual, norm)
    y = w.linear(x)
    return _finish(y if b is None else y + b, act, residual, norm)


FFN_ROWS = 8192  # most rows per feed-forward chunk when the two matmuls run apart (see feed_forward)


def feed_forward(x: torch.Tensor, w_up, b_up: torch.Tensor | None, w_down, b_down: torch.Tensor | None, *,
                 act: str | None = None, norm: tuple | None = None) -> torch.Tensor:
    """norm(act(x @ w_up.T + b_up) @ w_down.T + b_down + x) for x [N, D]: a post-LN feed-forward block.

    With PackedWeights on the C GEMM's path both matmuls run in one pass over the rows: each thread's
    [48, F] hidden block stays in its cache instead of a [N, F] tensor going through memory (MiniLM,
    6400 rows: 87 ms instead of 99), bitwise equal to the two `linear` calls. Elsewhere the rows go in chunks of
    at most FFN_ROWS, so the hidden stays bounded (MiniLM at 256 x 256 tokens: 50 MB, not 400 MB)."""
    if isinstance(w_up, PackedWeight) and isinstance(w_down, PackedWeight) and act in cpu_gemm.ACTS:
        operands = (w_up.w, w_down.w, b_up, b_down, *(norm[:2] if norm else ()))
        if gemm_takes(x, *operands):
            return cpu_gemm.ffn(x, w_up.packed, b_up, w_down.packed, b_down, w_up.shape[0], act, norm)

    def block(xs: torch.Tensor) -> torch.Tensor:
        h = linear(xs, w_up, b_up, act=act)
        return linear(h, w_down, b_down, residual=xs, norm=norm)

    n = x.shape[0]
    if n <= FFN_ROWS:
        return block(x)
    rows = -(-n // -(-n // FFN_ROWS))  # equal chunks: no small tail on another kernel
    out = torch.empty_like(x)
    for s in range(0, n, rows):
        out[s : s + rows] = block(x[s : s + rows])
    return out


# The attention half runs as one C pass per task of `group` sequences (at least MC = 48 rows, so each
# pass over the weights serves enough rows; kernels/cpu_attention.attention_block) when that makes at
# least BLOCK_MIN_PER_THREAD tasks a thread (it is parallel over tasks). Measured on MiniLM's shapes
# against the three calls: 1.06-1.17x at 48-200 tokens, 1.1-1.2x at 12-32 tokens in groups, even at
# 14; 0.83x with 3 tasks on 2 threads.
BLOCK_MIN_PER_THREAD = 4


def _fused_group(B: int, T: int, wqkv, wo) -> int:
    """Sequences per task where B sequences of (at most) T tokens run the attention half fused in C, else 0."""
    group = -(-cpu_gemm.MC // max(T, 1))
    fused = isinstance(wqkv, PackedWeight) and isinstance(wo, PackedWeight) and cpu_attention.available()
    return group if fused and -(-B // group) >= BLOCK_MIN_PER_THREAD * torch.get_num_threads() else 0


def attention_block(x: torch.Tensor, wqkv, bqkv: torch.Tensor, wo, bo: torch.Tensor, n_heads: int,
                    key_mask: torch.Tensor | None, norm: tuple) -> torch.Tensor:
    """norm(encoder_attention(x @ wqkv.T + bqkv) @ wo.T + bo + x) for x [B, T, D], key_mask [B, T]
    bool or None: a post-LN attention half (BERT's). With PackedWeights on the C GEMM's path it runs
    fused per group of sequences where that is faster (their [rows, 3D] projection then stays in the
    thread's cache), else in three calls; the same bits either way."""
    B, T, _ = x.shape
    group = _fused_group(B, T, wqkv, wo)
    if group and gemm_takes(x, wqkv.w, wo.w, bqkv, bo, *norm[:2]):
        return cpu_attention.attention_block(x, wqkv.packed, bqkv, wo.packed, bo, n_heads, key_mask, norm,
                                             group=group)  # fmt: skip
    a = encoder_attention(linear(x, wqkv, bqkv), n_heads, key_mask)  # [B, T, D]
    return linear(a, wo, bo, residual=x, norm=norm)


def packed_attention_block(x: torch.Tensor, starts: torch.Tensor, longest: int, wqkv, bqkv: torch.Tensor, wo,
                           bo: torch.Tensor, n_heads: int, norm: tuple) -> torch.Tensor | None:
    """attention_block for sequences packed without their padding (x [N, D], sequence s in rows
    starts[s] .. starts[s + 1] - 1, none longer than `longest`), where attention_block would run them
    fused in C; None elsewhere (the caller then runs them padded)."""
    group = _fused_group(starts.numel() - 1, longest, wqkv, wo)
    if not (group and gemm_takes(x, wqkv.w, wo.w, bqkv, bo, *norm[:2])):
        return None
    return cpu_attention.packed_attention_block(x, starts, longest, wqkv.packed, bqkv, wo.packed, bo, n_heads, norm,
                                                group=group)  # fmt: skip


def embedding(w, ids: torch.Tensor) -> torch.Tensor:
    """Rows of w at ids. w: [vocab, dim], a PackedWeight or a quantized leaf."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    return w.embedding(ids)
