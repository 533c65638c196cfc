"""A C matrix multiply for many rows on CPU (fp32), with the bias, the activation, a residual add and a
LayerNorm fused into its write-back: y = norm(act(x @ w.T + b) + residual).

Why: BERT's encoder (and any prefill) is bound by fp32 matmuls of a few hundred to thousands of
rows. oneDNN, the fastest of torch's CPU GEMMs here, runs MiniLM's shapes at 152-163 GFLOP/s on this
project's 2-core AVX2 machine (FMA peak ~195-205); this kernel at 170-180 with its write-back (M =
6400, k = 384 / 1536, `make bench-kernels`), and the fused write-back removes the separate GELU,
residual-add and LayerNorm passes over the activations.

How (the BLIS / GotoBLAS scheme): the weight is packed once (`pack`) into panels of NR = 16 columns,
k-major, in blocks of KC rows of k; a task packs MC rows of x into MR-row panels and the micro-kernel
keeps its accumulators in registers while its weight panels stay in cache for all of the task's row
panels: 6 x 16 in 12 ymm on AVX2, 12 x 32 (two panels) in 24 zmm on AVX-512, where one Xeon core
runs MiniLM's shapes at 154-167 GFLOP/s (the AVX2 kernel there: 97-108; oneDNN 158-197; issue 22 in
benchmarks/RESULTS.md). Tasks (row blocks x column blocks) are balanced over OpenMP threads.

`ffn` runs a whole post-LN feed-forward block (up, activation, down, residual, LayerNorm) per block of
48 rows, the [48, F] hidden kept in the thread's cache between the two products: at MiniLM's 6400
rows that is 87 ms instead of the two calls' 99 (the [6400, 1536] hidden no longer goes through
memory; `make bench-kernels`), bitwise the same result.

Every output element is summed over k in the same order (k ascending within each KC block, the
blocks in order), whatever the number of rows, the thread or the tile it falls in: results are
deterministic and a row's result does not depend on its batch. The C code trusts the shapes it
gets: `linear` checks them first.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmfn import cbuild
from llmfn.kernels.cpu import check_shapes, ptr

# micro-tile rows, weight panel columns, k block, most rows per task, per ISA level (AVX2 measured on an
# AVX2 EPYC, AVX-512 on a Sapphire Rapids Xeon, whose micro-tile spans two panels: 12 x 32); the C
# code (csrc/gemm.h) gets them as -D defines, so these are the one place they are set. The packed
# layout (NR = 16) is the same on every level.
TILES = {"avx512": (12, 16, 384, 48), "amx": (12, 16, 384, 48)}
MR, NR, KC, MC = TILES.get(cbuild.isa()[0], (6, 16, 384, 48))
DEFINES = {"MR": MR, "NR": NR, "KC": KC, "MC": MC}
ACTS = {None: 0, "gelu": 1, "relu": 2}  # activations fused in C; others run in torch after it

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "llmfn_gemm_pack": [_p, _p, _i64, _i64],
    "llmfn_gemm": [_p, _p, _p, _p, _i64, _p, _i64, _i64, _i64, _i32, _p, _p, _f32, _i32],
    "llmfn_ffn": [_p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i32, _p, _p, _f32, _i32],
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled GEMM (csrc/gemm.c, built on first use by llmfn.cbuild), or None: no C compiler,
    or LLMFN_CPU_KERNELS=torch."""
    return cbuild.cpu_kernels("llmfn_gemm", "gemm.c", _SIGNATURES, defines=DEFINES)


def available() -> bool:
    return library() is not None


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [n, k] fp32 on CPU -> the packed layout llmfn_gemm reads (a flat fp32 tensor)."""
    n, k = w.shape
    w = w.contiguous()
    packed = torch.empty(k * -(-n // NR) * NR, dtype=torch.float32)
    library().llmfn_gemm_pack(w.data_ptr(), packed.data_ptr(), n, k)
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, n: int, b: torch.Tensor | None = None, act: str | None = None,
           residual: torch.Tensor | None = None, norm: tuple | None = None) -> torch.Tensor:
    """norm(act(x [..., k] @ w.T + b) + residual), w [n, k] given as pack(w); act in ACTS; norm None or
    a LayerNorm over the n outputs: (weight [n], bias [n], eps)."""
    k = x.shape[-1]
    ln_w, ln_b, eps = norm if norm is not None else (None, None, 0.0)
    ok = packed.numel() == k * -(-n // NR) * NR and all(t is None or tuple(t.shape) == (n,) for t in (b, ln_w, ln_b))
    ok = ok and (residual is None or tuple(residual.shape) == (*x.shape[:-1], n))
    check_shapes(ok, "linear", x, packed, b, residual, ln_w, ln_b, detail=f"n={n}")
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], n)
    b, residual, ln_w, ln_b = (None if t is None else t.contiguous() for t in (b, residual, ln_w, ln_b))
    status = library().llmfn_gemm(
        x.data_ptr(), packed.data_ptr(), ptr(b), ptr(residual), n, y.data_ptr(), y.numel() // max(n, 1), n, k, ACTS[act],
        ptr(ln_w), ptr(ln_b), eps, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("linear: cannot allocate the GEMM's scratch memory")
    return y


def ffn(x: torch.Tensor, up: torch.Tensor, b_up: torch.Tensor | None, down: torch.Tensor, b_down: torch.Tensor | None,
        f: int, act: str | None = None, norm: tuple | None = None) -> torch.Tensor:
    """norm(act(x @ w_up.T + b_up) @ w_down.T + b_down + x) for x [..., d], w_up [f, d] and w_down [d, f]
    given as pack(w): a feed-forward block in one pass, bitwise equal to the two `linear` calls."""
    d = x.shape[-1]
    ln_w, ln_b, eps = norm if norm is not None else (None, None, 0.0)
    ok = up.numel() == d * -(-f // NR) * NR and down.numel() == f * -(-d // NR) * NR
    ok = ok and all(t is None or tuple(t.shape) == (n,) for t, n in ((b_up, f), (b_down, d), (ln_w, d), (ln_b, d)))
    check_shapes(ok, "ffn", x, up, b_up, down, b_down, ln_w, ln_b, detail=f"f={f}")
    x = x.contiguous()
    y = torch.empty_like(x)
    b_up, b_down, ln_w, ln_b = (None if t is None else t.contiguous() for t in (b_up, b_down, ln_w, ln_b))
    status = library().llmfn_ffn(
        x.data_ptr(), up.data_ptr(), ptr(b_up), down.data_ptr(), ptr(b_down), y.data_ptr(), x.numel() // max(d, 1),
        d, f, ACTS[act], ptr(ln_w), ptr(ln_b), eps, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("ffn: cannot allocate the GEMM's scratch memory")
    return y
