"""CPU kernels for weight-only int4 / int8 linears (layouts in llmfn.kernels.quant).

Why a small C kernel: on this project's AVX2 machines none of torch's options beat it. Decode
(one activation row) of SmolLM2's [3072, 576] gate/up weight, one thread, weights from memory
(`python benchmarks/quant.py --kernels`): fp32 F.linear 681 us; this int4 kernel 185 us, int8 197 us;
torch `_weight_int4pack_mm_for_cpu` 7866 us with fp32 activations, 279 us with bf16 ones (which
would cost the model its fp32 numerics); `_weight_int8pack_mm` 1589 us; dequantize + F.linear
3685 us, the same fused by torch.compile 5263 us. The kernel streams the packed bytes once and
dequantizes in registers, in fp32:

    y[i, j] = sum_g scales[j, g] * (sum_{t in g} x[i, t] * q[j, t]) + offsets[j, g] * sum_{t in g} x[i, t]

for up to `max_rows()` activation rows (decode, small batches, short prompts; TILE_MAX_ROWS for the tiles
below); bigger inputs dequantize the weight in row chunks and call F.linear (the BLAS matmul is faster
once the weight is reused enough). On AVX-512
the group-32 kernels (GGUF Q4 / Q8_0) dequantize each group once, w = q * s + o in fp32, for up to 8
activation rows, then take two 16-lane FMAs per row and group: a 16-row decode step of SmolLM2 Q4_1
costs 4.6x one row instead of 6.8x (one thread, Xeon), which is what batched serving and speculative
verification pay. From 12 rows (int8: 16) csrc/ztile.h dequantizes a few weight rows once into a
buffer and runs tiles of 3 weight rows x 4 activation rows, the same per-output arithmetic with fewer
loads per FMA: prefill of 32-64 tokens 1.26-1.4x faster. Each row's summation order is fixed whatever the rows beside it (batch invariance).

Int8 activations (LLMFN_QUANT_ACTIVATIONS=int8; the default, fp32, keeps the exact product above). The
fp32-activation kernel is instruction-bound (unpacking nibbles to floats, then fp32 FMAs). As
llama.cpp does, each activation row is instead quantized per block of 32 (d = max|x| / 127) and a
weight block meets it in integer dot products: AVX-512 VNNI vpdpbusd (64 bytes an instruction),
AVX2 vpmaddubsw + vpmaddwd, or plain C on the scalar level (csrc/q8dot.h). The offsets term uses the
quantized activations' sums, as llama.cpp's Q8_1, which keeps the error proportional to the weights.
Per-call, one thread, AVX-512 Xeon: SmolLM2's gate/up [3072, 576] int4 135 -> 94 us, its int8
lm_head [49152, 576] 2206 -> 1275 us. What it costs (benchmarks/quant_accuracy.py, SmolLM2 Q4_1
against its dequantized fp32 model): max |logit diff| 1.19 (mean 0.15) vs 1e-4 with fp32
activations, greedy choice equal at 99.0% of 300 teacher-forced steps, perplexity 32.85 vs 32.42
(+1.3%) on a 165-token text: the arithmetic llama.cpp runs for these files. Not the default: that
1% of flipped greedy choices includes the default model's answer to "What is the capital of France?"
(int8 activations send SmolLM2's Q4_1 off into "L'Étoile, la Marseillaise, ..." at temperature 0),
and once the kernels prefetched their weight streams (csrc/simd.h) it stopped paying end to end:
SmolLM2 Q4_1 decodes at 188 tok/s either way on the Xeon's 2 cores (benchmarks/RESULTS.md). Each row is quantized
alone, so results stay batch-invariant, and the fused decoder layer (kinds 3 and 4) runs the same code.

On CPUs with AMX (the "amx" ISA level of llmfn.cbuild, when Linux grants the tile state) the
int8-activation kernels are csrc/amx.h instead: 16 weight rows at a time, each block of 32 summed
whole in int32 (tile products from 4 activation rows on, VNNI below: the same integers), then
acc = fma(block sum, s * d, acc) block by block. Same quantized activations as above, a different fp32
summation order (so other bits than the AVX-512 level, batch-invariant the same way). SmolLM2's
gate/up, one thread: 1 row 65 us (q8dot.h 53), 16 rows 192 us (700), 64 rows 642 us (3130); the
engine's 16-row decode step 18.4 ms with int8 activations against 32.0 with fp32 ones. There the
kernel also takes prompts longer than MAX_ROWS (AMX_ROWS rows a call), which the other paths leave to
dequantize + matmul.

The C code (csrc/quant.h, q8dot.h) is compiled once per machine into kernels/cpu.py's library, in
LLMFN_HOME/kernels/. Without a compiler, or with LLMFN_QUANT_KERNEL=torch, `available()` is False
and llmfn.kernels.quant falls back to dequantize + F.linear (same numbers up to summation order).
"""

from __future__ import annotations

import ctypes
import os

import torch

from llmfn.errors import LlmfnError
from llmfn.kernels import cpu

# Largest number of activation rows the streaming kernels take (`max_rows()`); more rows go dequant +
# matmul. With csrc/ztile.h's tiles (AVX-512 builds): MAX_ROWS, from an early crossover on 2 cores
# ([3072, 576], int4 / int8: 64 rows 3.1 / 2.6 ms in the kernel vs 4.0 / 4.6 ms dequant + matmul; 128
# rows 6.4 / 5.4 vs 5.1 / 5.7 ms). Without them (AVX2, scalar): MAX_ROWS_NO_TILES, re-measured on the
# AVX2 EPYC once dequantization was vectorized: SmolLM2 prefill, 2 threads, kernel up to 64 rows vs up
# to 20, alternating in one process (tok/s, int4 / Q8_0 / Q4_K_M): 24 tokens 182 / 304 / 245 vs 166 /
# 239 / 191, 48 tokens 283 / 286 / 250 vs 294 / 267 / 259, 64 tokens 270 / 264 / 330 vs 367 / 297 /
# 370 (a lone [3072, 576] linear, warm, crosses over sooner: ~20 rows). Never below kernels.cpu.MAX_ROWS:
# the engine's decode steps of up to that many rows rely on each row taking the kernel (batch invariance).
MAX_ROWS = 64
MAX_ROWS_NO_TILES = 48
# Where csrc/ztile.h's tiles are built (AVX-512), int4 group-32 weights with fp32 activations keep the
# kernel up to TILE_MAX_ROWS rows. SmolLM2's shapes, 2 threads, Xeon, tiles vs dequantize + matmul:
# gate/up 80 rows 1.50 vs 1.76 ms, 112: 1.97 vs 2.08, 128: 2.30 vs 2.21; down 80: 0.77 vs 1.05, 128:
# 1.25 vs 1.20; qkv 80: 0.46 vs 0.75, 128: 0.72 vs 0.81.
TILE_MAX_ROWS = 112
# Rows of the weight dequantized at a time on the F.linear path (bounds the temporary).
CHUNK_ROWS = 4096
# With int8 activations on AMX tiles the kernel beats dequantize + matmul at every prompt length
# measured (SmolLM2's gate/up [3072, 576], 2 threads, Xeon: 64 rows 0.39 vs 1.62 ms, 128: 0.75 vs
# 1.87, 512: 3.6 vs 5.3): it takes any number of rows, at most AMX_ROWS a call (each row keeps an
# accumulator per tile of 16 weight rows on the stack).
AMX_ROWS = 512


def _load() -> ctypes.CDLL | None:
    """kernels/cpu.py's library, which holds these kernels (csrc/quant.h)."""
    if os.environ.get("LLMFN_QUANT_KERNEL", "c") == "torch":
        return None
    return cpu.library()


def available() -> bool:
    """True when the compiled kernels load (compiling them on first use)."""
    return _load() is not None


def int8_activations() -> bool:
    """Whether int4 / int8 linears quantize their activations to int8 per block of 32 and take integer dot
    products (LLMFN_QUANT_ACTIVATIONS=int8) or keep them fp32, the exact product with the dequantized
    weight (=fp32, the default: see the module docstring). Read per call: the env var switches a
    running process too."""
    mode = os.environ.get("LLMFN_QUANT_ACTIVATIONS", "fp32")
    if mode not in ("int8", "fp32"):
        raise LlmfnError(f"LLMFN_QUANT_ACTIVATIONS must be int8 or fp32, not {mode!r}")
    return mode == "int8"


def on_tiles(act8: bool) -> bool:
    """Whether a call with these activations runs on AMX tiles (csrc/amx.h: int8 activations, the amx
    level of llmfn.cbuild, tile state granted by Linux)."""
    return act8 and bool(_load().llmfn_amx_active())


def _in_slices(x: torch.Tensor, linear) -> torch.Tensor:
    return torch.cat([linear(x[i : i + AMX_ROWS]) for i in range(0, x.shape[0], AMX_ROWS)])


def half(scales: torch.Tensor) -> bool:
    """Whether a weight's scales (and int4 offsets, of the same dtype) are stored fp16 (the C kernels
    widen them per weight row; llmfn.kernels.quant) rather than fp32."""
    return scales.dtype == torch.float16


def int4_ok(k: int, group_size: int) -> bool:
    return group_size % 32 == 0 and k % group_size == 0


def int8_ok(k: int, group_size: int) -> bool:
    return group_size % 8 == 0 and k % group_size == 0


def int8_act8_ok(k: int, group_size: int) -> bool:
    """Whether an int8 weight takes the int8-activation kernel (blocks of 32 within its groups)."""
    return group_size % 32 == 0 and k % group_size == 0


def max_rows() -> int:
    """Most activation rows a call gives the kernel before dequantize + matmul wins (int4: int4_max_rows)."""
    return MAX_ROWS if _load().llmfn_row_tiles() else MAX_ROWS_NO_TILES


def int4_max_rows(group_size: int, act8: bool) -> int:
    """Most activation rows an int4 call gives the kernel before dequantize + matmul wins."""
    return TILE_MAX_ROWS if group_size == 32 and not act8 and _load().llmfn_row_tiles() else max_rows()


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [m, k] fp32 contiguous @ int4 weight [n, k]^T -> [m, n] fp32 (layout in llmfn.kernels.quant)."""
    lib = _load()
    m, k = x.shape
    n = qweight.shape[0]
    act8 = int8_activations()
    if m > int4_max_rows(group_size, act8) and not on_tiles(act8):
        return _chunked(x, n, lambda lo, hi: int4_dequantize(qweight[lo:hi], scales[lo:hi], offsets[lo:hi], group_size))
    if m > AMX_ROWS:
        return _in_slices(x, lambda rows: int4_linear(rows, qweight, scales, offsets, group_size))
    y = torch.empty(m, n, dtype=torch.float32)
    lib.llmfn_int4_linear(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), y.data_ptr(),
                          m, n, k, group_size, act8, half(scales), cpu.decode_threads.threads())
    return y


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [m, k] fp32 contiguous @ int8 weight [n, k]^T -> [m, n] fp32."""
    lib = _load()
    m, k = x.shape
    n = qweight.shape[0]
    act8 = int8_activations() and int8_act8_ok(k, group_size)
    if m > max_rows() and not on_tiles(act8):
        return _chunked(x, n, lambda lo, hi: int8_dequantize(qweight[lo:hi], scales[lo:hi], group_size))
    if m > AMX_ROWS:
        return _in_slices(x, lambda rows: int8_linear(rows, qweight, scales, group_size))
    y = torch.empty(m, n, dtype=torch.float32)
    lib.llmfn_int8_linear(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(),
                          m, n, k, group_size, act8, half(scales), cpu.decode_threads.threads())
    return y


def _chunked(x: torch.Tensor, n: int, dequant) -> torch.Tensor:
    # cpu.dense_linear: the fastest dense fp32 matmul for these rows (oneDNN's)
    if n <= CHUNK_ROWS:
        return cpu.dense_linear(x, dequant(0, n))
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(n, lo + CHUNK_ROWS)
        y[:, lo:hi] = cpu.dense_linear(x, dequant(lo, hi))
    return y


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dense fp32 [n, k] = q * scales + offsets (contiguous CPU inputs)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    w = torch.empty(n, k, dtype=torch.float32)
    _load().llmfn_int4_dequant(qweight.data_ptr(), scales.data_ptr(), offsets.data_ptr(), w.data_ptr(),
                               n, k, group_size, half(scales), cpu.decode_threads.threads())
    return w


def int8_dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dense fp32 [n, k] = q * scales (contiguous CPU inputs)."""
    n, k = qweight.shape
    w = torch.empty(n, k, dtype=torch.float32)
    _load().llmfn_int8_dequant(qweight.data_ptr(), scales.data_ptr(), w.data_ptr(), n, k, group_size,
                               half(scales), cpu.decode_threads.threads())
    return w
