"""Decode's matrix-vector products at SmolLM2-135M's shapes (30 layers of qkv, o, gate_up, down, then
the tied lm_head: every weight once, as one token's forward reads them), fp32 against bf16 weights:
llmfn's widening kernel (csrc/bf16.h, what bf16 models run) and the vdpbf16ps alternative
(csrc/bf16_dpbf16.c: activations rounded to bf16). Prints the best of --repeats passes, the weight
bytes streamed per second and each variant's max error against fp64. --cpu-time times one thread's
CPU time (time.thread_time) instead of the wall clock: steadier on a machine other work shares.

    python benchmarks/bf16_gemv.py [--repeats 10] [--threads N | --cpu-time]
"""

from __future__ import annotations

import argparse
import ctypes
import time

# isort: off
import llmfn  # noqa: F401  (before torch: llmfn's OpenMP defaults apply)
import torch

# isort: on
from llmfn import cbuild
from llmfn.kernels import cpu

D, F_, QKV, LAYERS, VOCAB = 576, 1536, 960, 30, 49152
SHAPES = [(QKV, D), (D, D), (2 * F_, D), (D, F_)] * LAYERS + [(VOCAB, D)]


def dpbf16_library():
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {"llmfn_dpbf16_gemv": [p, p, p, i64, i64, i32], "llmfn_dpbf16_ok": []}
    lib = cbuild.load("llmfn_bf16_dpbf16", "bf16_dpbf16.c", sigs)
    return lib if lib is not None and lib.llmfn_dpbf16_ok() else None


def best_pass(step, weights, repeats: int, clock) -> float:
    step(weights)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = clock()
        step(weights)
        times.append(clock() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU time")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.cpu_time else args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    g = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(n, k, generator=g) * 0.05 for n, k in SHAPES]
    bf16 = [w.bfloat16() for w in fp32]
    x = {k: torch.randn(1, k, generator=g) for k in {k for _, k in SHAPES}}
    dp = dpbf16_library()

    def run_fp32(ws):
        return [cpu.linear(x[w.shape[1]], w) for w in ws]

    def run_bf16(ws):
        return [cpu.bf16_linear(x[w.shape[1]], w) for w in ws]

    def run_dp(ws):
        out = []
        for w in ws:
            y = torch.empty(1, w.shape[0])
            dp.llmfn_dpbf16_gemv(x[w.shape[1]].data_ptr(), w.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1],
                                 torch.get_num_threads())
            out.append(y)
        return out

    variants = [("fp32 (llmfn_gemv)", run_fp32, fp32), ("bf16 widened (llmfn_bf16_gemv)", run_bf16, bf16)]
    if dp is not None:
        variants.append(("bf16 vdpbf16ps, x rounded to bf16", run_dp, bf16))
    print(f"# {len(SHAPES)} matrix-vector products per pass (SmolLM2-135M: {LAYERS} layers + lm_head), "
          f"threads {torch.get_num_threads()}, ISA level {cbuild.isa()[0]}, best of {args.repeats}, "
          f"{'CPU time' if args.cpu_time else 'wall clock'}")
    print("| kernel | ms / pass | weight GB/s | lm_head: max error / max value, vs fp64 on its weights |")
    print("|---|---:|---:|---:|")
    for name, step, ws in variants:
        want = x[D].double() @ ws[-1].double().T
        t = best_pass(step, ws, args.repeats, clock)
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        err = ((step(ws[-1:])[0].double() - want).abs().max() / want.abs().max()).item()
        print(f"| {name} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {err:.2e} |")


if __name__ == "__main__":
    main()
