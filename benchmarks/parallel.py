"""Tensor / pipeline parallel on this host's cores: SmolLM2-135M-Instruct decode at TP 1 / 2 and
PP 1 / 2 (gloo over loopback), weight bytes per rank, and the collectives' time per token.

    python benchmarks/parallel.py [--tokens 64] [--repeat 3] [--quantize int4]

Each layout runs in processes of its own (torch.multiprocessing spawn): the ranks share the host's
cores, so at 2 ranks each rank gets cores / 2 threads, and TP 1 is shown at all the cores and at
cores / 2 (one rank's share: how much of a 2-rank speed-up is the split itself). Decode tok/s is
tokens 2..n of a greedy generation after a 128-token prompt, best of --repeat; "collective ms/token"
is the time rank 0 spent in llmfn.parallel's all-reduce / all-gather (tensor parallel) during the
timed decode, divided by its tokens (waits for the slower rank included); "one all-reduce alone" is a
hidden-size all-reduce timed in a loop of its own after the decode: the latency floor of gloo here.
Pipeline send / recv / broadcast time is in its tok/s only."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import llmfn  # noqa: E402, I001  (before torch: llmfn sets its OpenMP defaults)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from llmfn import parallel  # noqa: E402
from llmfn.parallel import tensor as tp  # noqa: E402
from llmfn.perf import measure  # noqa: E402

MODEL = "smollm2-135m-instruct"
TEXT = ("The quick brown fox jumps over the lazy dog while the scientist writes notes about rotary "
        "embeddings, caches and the speed of matrix multiplication. ")  # fmt: skip


def weight_bytes(tree, seen: set | None = None) -> int:
    """Bytes of every tensor in a params tree (leaf types looked through), each storage once (tied)."""
    seen = set() if seen is None else seen
    if isinstance(tree, dict):
        return sum(weight_bytes(v, seen) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(weight_bytes(v, seen) for v in tree)
    if isinstance(tree, torch.Tensor):
        key = tree.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return tree.untyped_storage().nbytes()
    if hasattr(tree, "__dataclass_fields__"):
        return sum(weight_bytes(getattr(tree, f), seen) for f in tree.__dataclass_fields__)
    return 0


def rank_main(rank: int, world: int, port: int, layout: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(layout["threads"])
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = llmfn.load(layout["model"], quantize=layout.get("quantize"))
    full_bytes = weight_bytes(model.params)
    if world > 1:
        model = parallel.shard(model, pipeline=layout["pipeline"], vocab=layout.get("vocab", "split"))
    ids = model.tokenizer.encode(TEXT)
    prompt = (ids * (128 // len(ids) + 1))[:128]
    runs = []
    for _ in range(layout["repeat"] + 1):  # the first is a warm-up
        tp.COMM.update(seconds=0.0, calls=0)
        report = measure(model, prompt, layout["tokens"], temperature=0.0, seed=0)
        runs.append((report.decode_tok_s, report.prefill_s, tp.COMM["seconds"], tp.COMM["calls"]))
    best = max(runs[1:])
    latency = allreduce_latency(model.cfg.hidden_size) if layout["pipeline"] == 1 and world > 1 else 0.0
    # COMM covers prefill + decode; the prefill's share is 2 collectives a layer + 2, like one step's
    steps = layout["tokens"]
    result = {"rank": rank, "full_bytes": full_bytes, "bytes": weight_bytes(model.params), "decode_tok_s": best[0],
              "prefill_s": best[1], "comm_ms_per_token": 1000 * best[2] / steps, "comm_calls_per_token": best[3] / steps, "allreduce_us": latency}  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def allreduce_latency(hidden: int, rounds: int = 300) -> float:
    """Mean microseconds of a decode step's all-reduce (one row of the hidden size) alone, ranks in step."""
    x = torch.ones(1, 1, hidden)
    dist.barrier()
    for _ in range(20):
        tp.all_reduce(x, dist.group.WORLD)
    start = tp.COMM["seconds"]
    for _ in range(rounds):
        tp.all_reduce(x, dist.group.WORLD)
    return 1e6 * (tp.COMM["seconds"] - start) / rounds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(world: int, layout: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(world, free_port(), layout, out), nprocs=world, start_method="spawn")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quantize", choices=("int4", "int8"))
    ap.add_argument("--model", default=MODEL, help=f"alias or folder (default {MODEL})")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    base = {"model": args.model, "tokens": args.tokens, "repeat": args.repeat, "quantize": args.quantize, "pipeline": 1}
    layouts = [
        ("TP 1 / PP 1", 1, {**base, "threads": cores}),
        (f"TP 1 / PP 1, {max(1, cores // 2)} thread(s)", 1, {**base, "threads": max(1, cores // 2)}),
        ("TP 2, vocab split", 2, {**base, "threads": max(1, cores // 2)}),
        ("TP 2, vocab replicated", 2, {**base, "threads": max(1, cores // 2), "vocab": "replicated"}),
        ("PP 2", 2, {**base, "threads": max(1, cores // 2), "pipeline": 2}),
    ]
    weights = args.quantize or "fp32"
    print(f"{args.model} {weights}, prompt 128, {args.tokens} generated, greedy, best of {args.repeat}; "
          f"{cores} cores")  # fmt: skip
    print("| layout | ranks | weight MB per rank (of full) | decode tok/s | collective ms/token | collectives/token "
          "| one all-reduce alone, us |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, world, layout in layouts:
        ranks = run_layout(world, layout)
        r0 = ranks[0]
        mb = " / ".join(f"{r['bytes'] / 1e6:.0f}" for r in ranks)
        print(f"| {name} | {world} | {mb} (of {r0['full_bytes'] / 1e6:.0f}) | {r0['decode_tok_s']:.1f} | "
              f"{r0['comm_ms_per_token']:.2f} | {r0['comm_calls_per_token']:.1f} | {r0['allreduce_us']:.0f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
