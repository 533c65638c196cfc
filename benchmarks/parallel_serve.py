"""Serving throughput of the scale-out layouts: `llmfn serve` as one process, with --tensor-parallel 2,
--pipeline-parallel 2 (with and without --micro-batches 2) and --replicas 1 / 2 on Ray Serve, each
started as its own server and driven over HTTP with the same load.

    python benchmarks/parallel_serve.py [--requests 16] [--concurrency 8] [--tokens 64] [--rounds 3]

The load: `requests` raw completions of distinct prompts (no shared prefix), `concurrency` in flight
at a time, greedy, `tokens` each (EOS suppressed with logit_bias, so every request generates them all),
after two warm-up requests, `rounds` times on the same server. Aggregate tok/s = completion tokens /
wall seconds of one round's load; best and median over the rounds (best: what contention left).
Every layout runs on this host's cores: 2 ranks or 2 replicas split them."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = "smollm2-135m-instruct"
TOPICS = ["a lighthouse", "a bicycle", "the moon", "bread", "a violin", "rain", "a library", "chess", "a river",
          "tea", "a glacier", "trains", "a clock", "bees", "a harbour", "paper"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "llmfn.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def complete(base: str, prompt: str, tokens: int, eos: dict) -> tuple[int, str | None]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logit_bias": eos}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], r.headers.get("x-llmfn-replica")


def load(base: str, requests: int, concurrency: int, tokens: int, eos: dict) -> tuple[float, int, int]:
    prompts = [f"Here is a long and careful essay about {TOPICS[i % len(TOPICS)]} ({i}):" for i in range(requests)]
    for p in prompts[:2]:
        for _ in range(60):  # a server may answer 503 while it loads
            try:
                complete(base, "Warm-up: " + p, 4, eos)
                break
            except httpx.HTTPStatusError:
                time.sleep(2)
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda p: complete(base, p, tokens, eos), prompts))
    wall = time.perf_counter() - start
    return wall, sum(n for n, _ in done), len({name for _, name in done if name})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated layout names to run (default all)")
    args = ap.parse_args()
    sys.path.insert(0, str(SRC))
    import llmfn
    from llmfn.generate import eos_ids

    eos = {str(t): -100 for t in eos_ids(llmfn.load(MODEL))}
    base = ["--model", MODEL]
    layouts = {
        "one process": base,
        "TP 2": [*base, "--tensor-parallel", "2"],
        "PP 2": [*base, "--pipeline-parallel", "2"],
        "PP 2 micro-batches 2": [*base, "--pipeline-parallel", "2", "--micro-batches", "2"],
        # --replicas 1 alone serves in this process; a Ray address ("local": a new local Ray) forces Ray Serve
        "replicas 1 (Ray Serve)": [*base, "--replicas", "1", "--ray-address", "local"],
        "replicas 2 (Ray Serve)": [*base, "--replicas", "2"],
    }
    chosen = args.only.split(",") if args.only else list(layouts)
    print(f"{MODEL} (GGUF Q4_1 blocks), {args.requests} requests x {args.tokens} tokens, {args.concurrency} "
          f"in flight, greedy; {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| layout | aggregate tok/s, best | median | replicas that served | load avg after |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            proc, url = start(layouts[name], Path(tmp, f"{len(name)}.log"))
            try:
                runs = [load(url, args.requests, args.concurrency, args.tokens, eos) for _ in range(args.rounds)]
            finally:
                stop(proc)
            rates = sorted(tokens / wall for wall, tokens, _ in runs)
            replicas = max(r for _, _, r in runs)
            print(f"| {name} | {rates[-1]:.1f} | {statistics.median(rates):.1f} | {replicas or '-'} | "
                  f"{os.getloadavg()[0]:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
