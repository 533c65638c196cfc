"""The paged KV cache, measured on the default server (SmolLM2-135M chat + MiniLM embeddings, no
limits set), as a user runs it: `python -m llmfn.serve` on a free port, driven over HTTP.

1. memory: the worker's resident set after warm-up and after 64 mixed requests (chat of several
   lengths, 16 at a time, and embeddings);
2. concurrency: one streaming chat request alone (the median of three runs), then 32 at once
   (max_tokens 64): all must be served, none refused; aggregate generated tokens/s against the one
   alone;
3. prefix cache: a ~1,500-token shared system prompt, two questions: time to first token of the
   first and the second request, the second's usage.prompt_tokens_details.cached_tokens, and its
   answer (greedy) against a cold server's answer to the same request.

    python benchmarks/kv_cache.py [--skip-cold]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import QUESTIONS, start_llmfn  # noqa: E402

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
SYSTEM = " ".join(
    f"Rule {i}: when the user asks about topic {i}, answer politely, cite the handbook section {i}.{i % 7}, "
    f"and keep the answer under {20 + i % 30} words." for i in range(60)
)  # ~1,500 tokens of shared system prompt


def rss_of_tree(pid: int) -> int:
    """The largest resident set (bytes) among pid and its descendants: the worker holding the models."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    best, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return best


async def stream_chat(http: httpx.AsyncClient, messages: list[dict], max_tokens: int, seed: int,
                      temperature: float = 0.7) -> dict:
    body = {"model": CHAT, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    out = {"status": 0, "ttft": None, "text": "", "usage": None}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                out["ttft"] = out["ttft"] or time.perf_counter() - t0
                out["text"] += chunk["choices"][0]["delta"]["content"]
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
    out["latency"] = time.perf_counter() - t0
    return out


def question(i: int) -> list[dict]:
    return [{"role": "user", "content": "Tell me a long story about " + QUESTIONS[i % len(QUESTIONS)].lower()}]


async def mixed(http: httpx.AsyncClient, n: int) -> None:
    sem = asyncio.Semaphore(16)

    async def one(i: int):
        async with sem:
            if i % 4 == 3:
                await http.post("/v1/embeddings", json={"model": EMBED, "input": [QUESTIONS[i % 8]] * (1 + i % 5)})
            else:
                await stream_chat(http, question(i), 16 + 24 * (i % 5), seed=i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def concurrency(http: httpx.AsyncClient) -> dict:
    # one request alone, the median of three (a single run varied 81-118 tok/s on the 2-core VM)
    runs = [await stream_chat(http, question(1), 64, seed=1) for _ in range(3)]
    alone = sorted(runs, key=lambda r: r["usage"]["completion_tokens"] / r["latency"])[1]
    t0 = time.perf_counter()
    many = await asyncio.gather(*(stream_chat(http, question(i), 64, seed=i) for i in range(32)))
    wall = time.perf_counter() - t0
    served = [r for r in many if r["status"] == 200 and r["usage"]]
    one_tps = alone["usage"]["completion_tokens"] / alone["latency"]
    all_tps = sum(r["usage"]["completion_tokens"] for r in served) / wall
    return {"served": len(served), "refused": 32 - len(served), "one_tok_s": one_tps, "agg_tok_s": all_tps,
            "ratio": all_tps / one_tps, "wall_s": wall}  # fmt: skip


def system_messages(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


async def shared_prefix(http: httpx.AsyncClient) -> dict:
    first = await stream_chat(http, system_messages("What does rule 7 say?"), 24, seed=0, temperature=0.0)
    second = await stream_chat(http, system_messages("What does rule 42 say?"), 24, seed=0, temperature=0.0)
    return {"first_ttft": first["ttft"], "second_ttft": second["ttft"], "prompt_tokens": second["usage"]["prompt_tokens"],
            "cached_tokens": second["usage"].get("prompt_tokens_details", {}).get("cached_tokens"),
            "second_text": second["text"]}  # fmt: skip


async def cold_answer(http: httpx.AsyncClient) -> str:
    return (await stream_chat(http, system_messages("What does rule 42 say?"), 24, seed=0, temperature=0.0))["text"]


def serve(log_name: str):
    log = Path(tempfile.mkdtemp(prefix="llmfn-kv-")) / log_name
    return start_llmfn(None, None, log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-cold", action="store_true", help="no second (cold) server for the answer check")
    args = ap.parse_args()
    proc, url = serve("server.log")
    try:
        rss_ready = rss_of_tree(proc.pid)

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=900) as http:
                await mixed(http, 64)
                rss_mixed = rss_of_tree(proc.pid)
                conc = await concurrency(http)
                prefix = await shared_prefix(http)
                stats = (await http.get("/metrics")).text
                return rss_mixed, conc, prefix, stats

        rss_mixed, conc, prefix, metrics = asyncio.run(run())
        rss_end = rss_of_tree(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    same = None
    if not args.skip_cold:
        proc, url = serve("cold.log")
        try:
            async def cold():
                async with httpx.AsyncClient(base_url=url, timeout=900) as http:
                    return await cold_answer(http)

            same = asyncio.run(cold()) == prefix["second_text"]
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(60)
    gib = 2**30
    print(f"# paged KV cache, default server: {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print("| measure | value |\n|---|---:|")
    print(f"| worker RSS after warm-up | {rss_ready / gib:.2f} GiB |")
    print(f"| worker RSS after 64 mixed requests | {rss_mixed / gib:.2f} GiB |")
    print(f"| worker RSS at the end | {rss_end / gib:.2f} GiB |")
    print(f"| 32 concurrent streams (max_tokens 64): served / refused | {conc['served']} / {conc['refused']} |")
    print(f"| one stream alone, generated tok/s | {conc['one_tok_s']:.1f} |")
    print(f"| 32 concurrent streams, aggregate generated tok/s | {conc['agg_tok_s']:.1f} ({conc['ratio']:.1f}x) |")
    print(f"| shared system prompt: prompt tokens | {prefix['prompt_tokens']} |")
    print(f"| TTFT first / second request | {1000 * prefix['first_ttft']:.0f} / {1000 * prefix['second_ttft']:.0f} ms "
          f"({prefix['second_ttft'] / prefix['first_ttft']:.2f}x) |")  # fmt: skip
    print(f"| second request's cached_tokens | {prefix['cached_tokens']} |")
    print(f"| second answer identical to a cold server's | {same} |")
    for line in metrics.splitlines():
        if line.startswith(("llmfn_kv_", "llmfn_requests_running")):
            print(f"#   {line}")


if __name__ == "__main__":
    main()
