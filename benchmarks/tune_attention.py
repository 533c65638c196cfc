"""Sweep the Triton attention kernels' launch settings on a CUDA GPU, beside SDPA, fp16.

    python benchmarks/tune_attention.py

Each row: GPU time from `triton.testing.do_bench` and from `do_bench_cudagraph` (one CUDA graph
replay: the kernels alone), and the max error against the torch reference. Compare the graph
column: the launchers called directly, as here, go through torch's wrap_triton dispatch, which costs
~0.4 ms of host time per call (the model calls them through the torch.ops.llmfn custom ops, which
skip it; benchmarks/triton_kernels.py times that path). The launchers' defaults come from this table."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

SHAPES = {"smollm2-135m": (9, 3, 64), "llama3-8b": (32, 8, 128)}
PREFILL = [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4),
           (128, 128, 8, 2), (64, 128, 4, 2)]  # fmt: skip
DECODE = [(64, 0, 4, 2), (32, 0, 4, 2), (128, 0, 4, 2), (128, 0, 8, 2), (64, 16, 4, 2), (64, 32, 4, 2),
          (64, 64, 4, 2), (128, 32, 4, 3), (256, 32, 8, 2), (32, 64, 2, 2)]  # fmt: skip


def timed(fn) -> tuple[float, float]:
    from triton.testing import do_bench, do_bench_cudagraph

    fn()
    try:
        graph = do_bench_cudagraph(fn)
    except Exception:  # noqa: BLE001 - e.g. an op that syncs with the host cannot be captured
        graph = float("nan")
    return do_bench(fn), graph


def row(case: str, settings: str, fn, want: torch.Tensor) -> None:
    """One table row: times and max error, or the failure (a setting the GPU cannot run is a row)."""
    try:
        err = (fn().float() - want).abs().max().item()
        print(f"| {case} | {settings} | " + " | ".join(f"{x:.4f}" for x in timed(fn)) + f" | {err:.2e} |")
    except Exception as e:  # noqa: BLE001
        print(f"| {case} | {settings} | failed: {type(e).__name__} | | |")


def sweep(name: str, hq: int, hk: int, hd: int) -> None:
    """Prefill (2048 causal) and decode (8 rows at 4000 of 8192) rows for one model's head shape."""
    from llmfn.kernels import reference as ref
    from llmfn.kernels import triton_attention as ta

    dev, dt = "cuda", torch.float16
    s = 2048
    q = torch.randn(1, hq, s, hd, device=dev, dtype=dt)
    k = torch.randn(1, hk, s, hd, device=dev, dtype=dt)
    v = torch.randn_like(k)
    pos = torch.arange(s, device=dev)[None]
    want = ref.attention(q, k, v, pos, hd**-0.5).float()
    case = f"{name} prefill causal s={s}"
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5, enable_gqa=True)
    print(f"| {case} | SDPA is_causal | " + " | ".join(f"{x:.4f}" for x in timed(sdpa)) + " | |")
    for bm, bn, w, st in PREFILL:
        fn = lambda bm=bm, bn=bn, w=w, st=st: ta.prefill(q, k, v, pos, hd**-0.5, block_m=bm, block_n=bn,
                                                         num_warps=w, num_stages=st)  # fmt: skip
        row(case, f"M={bm} N={bn} warps={w} stages={st}", fn, want)

    b, t = 8, 8192
    q = torch.randn(b, hq, 1, hd, device=dev, dtype=dt)
    k = torch.randn(b, hk, t, hd, device=dev, dtype=dt)
    v = torch.randn_like(k)
    pos = torch.full((b, 1), 4000, device=dev)
    want = ref.attention(q, k, v, pos, hd**-0.5).float()
    case = f"{name} decode b={b} pos=4000 cache={t}"
    kk, vv = k[:, :, :4001], v[:, :, :4001]
    sdpa = lambda: F.scaled_dot_product_attention(q, kk, vv, scale=hd**-0.5, enable_gqa=True)
    print(f"| {case} | SDPA on the 4001 visible keys | " + " | ".join(f"{x:.4f}" for x in timed(sdpa)) + " | |")
    masked = lambda: ref.attention(q, k, v, pos, hd**-0.5)
    print(f"| {case} | torch SDPA + mask | " + " | ".join(f"{x:.4f}" for x in timed(masked)) + " | |")
    for bn, splits, w, st in DECODE:
        fn = lambda bn=bn, sp=splits, w=w, st=st: ta.decode(q, k, v, pos, hd**-0.5, num_splits=sp, block_n=bn,
                                                            num_warps=w, num_stages=st)  # fmt: skip
        row(case, f"N={bn} splits={splits or 'auto'} warps={w} stages={st}", fn, want)


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/tune_attention.py: needs a CUDA GPU (none found); nothing timed.")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16\n")
    print("| case | settings | do_bench ms | graph ms | max err |")
    print("|---|---|---:|---:|---:|")
    for name, (hq, hk, hd) in SHAPES.items():
        sweep(name, hq, hk, hd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
