"""Load generator for the OpenAI-compatible server: N concurrent streaming chat clients.

Reports requests/s, time to first token (p50, p95), output tokens/s over the run, and per-request
decode speed. Starts `python -m llmfn.serve --model MODEL` on a free port unless --url names a
running server; --peer-url runs the same load against another OpenAI-compatible server (llama.cpp's
llama-server, vLLM, ...) and prints its figures beside llmfn's.

    python benchmarks/load.py [--clients 8] [--requests 32] [--max-tokens 64] [--model smollm2-135m-instruct]
    python benchmarks/load.py --config server.toml --model NAME
    python benchmarks/load.py --url http://127.0.0.1:8000 --api-key sk-... --peer-url http://127.0.0.1:8080

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmfn.serve.config import models_from_paths

QUESTIONS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "What are three uses of a paperclip?",
    "Describe how a bicycle works.",
    "Give me a recipe for pancakes.",
    "Why do cats purr?",
    "Summarise the plot of a detective story you invent.",
    "List some tips for learning a new language.",
]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0  # seconds to the first content delta
    latency: float = 0.0  # seconds to [DONE]
    tokens: int = 0  # completion tokens (from the usage chunk)
    error: str = ""


async def one_request(http: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, error=chunk["error"].get("message", "error"))
                if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    return Result(True, ttft if ttft is not None else latency, latency, tokens)


async def run_load(
    url: str, model: str, clients: int, requests: int, max_tokens: int, api_key: str | None
) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        await one_request(http, model, 0, 4)  # warm-up, not counted
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        results: list[Result] = []

        async def worker():
            while not queue.empty():
                results.append(await one_request(http, model, queue.get_nowait(), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    ttfts = sorted(r.ttft for r in ok)
    decode = [(r.tokens - 1) / (r.latency - r.ttft) for r in ok if r.tokens > 1 and r.latency > r.ttft]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if not r.ok), ""),
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p95_ms": 1000 * percentile(ttfts, 95),
        "tokens": sum(r.tokens for r in ok),
        "tok_per_s": sum(r.tokens for r in ok) / wall,
        "decode_tok_per_s_per_request": statistics.median(decode) if decode else 0.0,
    }


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_llmfn(model: str | None, config: str | None, log: Path) -> tuple[subprocess.Popen, str]:
    """A server on a free port: with this config file, else this model, else the default models."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmfn.serve", "--port", str(port)]
    cmd += ["--config", config] if config else ["--model", model] if model else []
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); log: {log}\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"the server was not ready in time; log: {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running llmfn server (default: start one)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model to start and to request")
    ap.add_argument("--config", help="start the server with this config file (requests go to --model)")
    ap.add_argument("--api-key")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int, default=32, help="requests in all")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--peer-url", help="another OpenAI-compatible server to load the same way")
    ap.add_argument("--peer-model", help="the model name the peer expects (default: --model)")
    ap.add_argument("--peer-api-key")
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        log = Path(tempfile.mkdtemp(prefix="llmfn-load-")) / "server.log"
        what = f"--config {args.config}" if args.config else f"--model {args.model}"
        print(f"starting llmfn serve {what} (log: {log}) ...", flush=True)
        proc, url = start_llmfn(args.model, args.config, log)
    name = args.model if args.config else models_from_paths([args.model])[0].name  # the name it is served under
    try:
        rows = [
            (
                "llmfn",
                asyncio.run(run_load(url, name, args.clients, args.requests, args.max_tokens, args.api_key)),
            )
        ]
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(30)
    if args.peer_url:
        peer = asyncio.run(run_load(args.peer_url, args.peer_model or name, args.clients, args.requests,
                                    args.max_tokens, args.peer_api_key))  # fmt: skip
        rows.append(("peer", peer))

    print(f"\n{args.clients} concurrent streaming clients, {args.requests} requests, max_tokens {args.max_tokens}, "
          f"model {args.model}, {os.cpu_count()} CPUs")  # fmt: skip
    print(
        f"{'server':<8} {'req/s':>7} {'TTFT p50':>10} {'TTFT p95':>10} {'tok/s':>8} {'tok/s/req':>10} {'tokens':>7} {'errors':>6}"
    )
    for label, r in rows:
        print(f"{label:<8} {r['req_per_s']:>7.2f} {r['ttft_p50_ms']:>8.0f}ms {r['ttft_p95_ms']:>8.0f}ms "
              f"{r['tok_per_s']:>8.1f} {r['decode_tok_per_s_per_request']:>10.1f} {r['tokens']:>7} {r['errors']:>6}")  # fmt: skip
        if r["errors"]:
            print(f"         first error: {r['first_error']}")


if __name__ == "__main__":
    main()
