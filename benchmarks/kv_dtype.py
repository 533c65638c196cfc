"""The KV cache dtype (issue 19): a bf16 / fp16 cache against the exact fp32 default, on SmolLM2-135M
as the default server loads it (its Q4_1 blocks, fp32 activations).

1. accuracy: a text teacher-forced one token a step (the fused C decode path the engine uses), the
   largest |logit difference| to the fp32 cache's logits over all positions and the text's
   perplexity; greedy generation of --gen tokens from a few prompts through the Engine: how many
   tokens equal the fp32 cache's before the first that differs.
2. speed: one layer's C attention, and one decode step (the fused C layers over a paged pool), of 1
   and 16 rows at contexts of 256 and 2,048 positions; median wall and CPU (process) time of
   --repeats, the dtypes interleaved. On a shared machine run it with --threads 1 and read CPU time.
3. capacity: the blocks and the 2,048-token sequences a 512 MiB pool holds.

    python benchmarks/kv_dtype.py [--model smollm2-135m-instruct] [--gen 200] [--repeats 20] [--threads N]
                                  [--skip-accuracy] [--skip-speed]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import llmfn  # noqa: E402
from llmfn.backend import fused_forward  # noqa: E402
from llmfn.chat_template import apply_chat_template  # noqa: E402
from llmfn.engine import Engine, GenerationRequest  # noqa: E402
from llmfn.kernels import cpu  # noqa: E402
from llmfn.models import llama  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT = (
    "The lighthouse stood at the end of a long spit of sand, and for most of the year nobody came near it "
    "except the keeper, who rowed out every second week for oil, bread and the newspapers. He kept a log "
    "of the weather, the ships that passed and the birds that rested on the gallery rail, and in the "
    "winter evenings he read the old entries aloud to himself, as if the lamp were listening. One spring "
    "a storm tore the roof from the boat shed and carried the dinghy half a mile down the coast. The "
    "keeper walked the shore for two days before he found it, wedged between rocks and full of kelp, "
    "its oars gone. He mended it with planks from the shed, and when the supply boat finally came he "
    "asked the skipper for new oars, a tin of tar and a second lamp glass, because the first had cracked "
    "in the cold. The skipper laughed and said the company would sooner build a new lighthouse than pay "
    "for glass, but he brought it anyway, wrapped in straw, and stayed for tea. They talked about the "
    "price of coal, the new steamers that no longer needed the light, and the village school, where the "
    "skipper's daughter had learned to draw maps of the whole coast from memory. When he left, the "
    "keeper climbed the stairs, cleaned the new glass until it shone, and lit the lamp an hour early."
)
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, step by step.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for a simple vegetable soup and explain each step.",
]


def teacher_forced(model, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Logits [len(ids), V] of the text fed one token a step (decode steps: the fused C layers)."""
    cfg = model.cfg
    cache = llama.init_cache(cfg, 1, len(ids) + 1, dtype)
    out = []
    with torch.inference_mode():
        for p, tok in enumerate(ids):
            logits, cache = fused_forward(model.params, cfg, torch.tensor([[tok]]), torch.tensor([[p]]), cache)
            out.append(logits[0, 0])
    return torch.stack(out)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())


def accuracy(model, gen: int) -> None:
    ids = model.tokenizer.encode(TEXT)
    print(f"\n## accuracy: teacher-forced text of {len(ids)} tokens; greedy, {gen} tokens from {len(PROMPTS)} prompts")
    logits = {name: teacher_forced(model, ids, dt) for name, dt in DTYPES.items()}
    chats = [apply_chat_template(model.tokenizer, model.chat_template, [{"role": "user", "content": p}])
             for p in PROMPTS]  # fmt: skip
    greedy = {}
    for name in DTYPES:
        with Engine(model, kv_cache_dtype=name, max_running=len(chats)) as engine:
            greedy[name] = [r.token_ids for r in engine.generate_many(
                [GenerationRequest(c, gen, stop_token_ids=()) for c in chats])]  # fmt: skip
    print("| KV cache | max abs logit diff vs fp32 | mean abs diff | top-1 agreement (teacher-forced) | "
          "perplexity | greedy tokens equal to fp32's before the first difference |")
    print("|---|---:|---:|---:|---:|---|")
    base = logits["float32"]
    for name, lg in logits.items():
        diff = (lg - base).abs()
        agree = float((lg.argmax(-1) == base.argmax(-1)).float().mean())
        same = []
        for a, b in zip(greedy[name], greedy["float32"], strict=True):
            n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            same.append(str(n))
        print(f"| {name} | {float(diff.max()):.4f} | {float(diff.mean()):.5f} | {agree:.4f} | "
              f"{perplexity(lg, ids):.4f} | {' / '.join(same)} (of {gen}) |")  # fmt: skip


def filled_pool(cfg, blocks: int, dtype: torch.dtype) -> llama.KVCache:
    """A pool of `blocks` 16-position blocks holding keys and values of a plausible size (attention's
    cost does not depend on them)."""
    cache = llama.init_cache(cfg, blocks, 16, dtype)
    pattern = (torch.rand(1 << 20, generator=torch.Generator().manual_seed(0)) - 0.5).to(dtype)
    for t in (cache.k, cache.v):
        flat = t.view(-1)
        for i in range(0, flat.numel(), pattern.numel()):
            flat[i : i + pattern.numel()] = pattern[: flat.numel() - i]
    return cache


def step_times(model, rows: int, context: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of one decode step of `rows` rows at position context - 1 per dtype,
    the dtypes interleaved repeat by repeat (so a change in the machine's load hits them alike)."""
    cfg, per_row = model.cfg, context // 16
    table = (1 + torch.arange(rows * per_row, dtype=torch.int32)).view(rows, per_row)
    caches = {name: filled_pool(cfg, rows * per_row + 1, dt)._replace(blocks=table) for name, dt in DTYPES.items()}
    tok = torch.randint(0, cfg.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(1))
    pos = torch.full((rows, 1), context - 1)
    wall: dict[str, list[float]] = {name: [] for name in DTYPES}
    cpu_s: dict[str, list[float]] = {name: [] for name in DTYPES}
    with torch.inference_mode():
        for i in range(repeats + 2):
            for name, cache in caches.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fused_forward(model.params, cfg, tok, pos, cache)
                if i >= 2:
                    wall[name].append(time.perf_counter() - w0)
                    cpu_s[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu_s[name])) for name in DTYPES}


def speed(model, repeats: int) -> None:
    threads = torch.get_num_threads()
    print(f"\n## decode step (fused C layers, paged pool) on {threads} thread(s), median of {repeats}; "
          "tok/s = rows / CPU time per thread")  # fmt: skip
    print("| rows | context | KV cache | step ms (wall) | step ms (CPU) | tok/s | vs fp32 (CPU time) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for rows in (1, 16):
        for context in (256, 2048):
            times = step_times(model, rows, context, repeats)
            base = times["float32"][1]
            for name, (wall, cpu_t) in times.items():
                print(f"| {rows} | {context} | {name} | {wall * 1e3:.1f} | {cpu_t * 1e3:.1f} | "
                      f"{rows * threads / cpu_t:.1f} | {base / cpu_t:.2f}x |", flush=True)  # fmt: skip


def attention_time(model, rows: int, context: int, repeats: int) -> dict[str, float]:
    """Median CPU seconds of one layer's C attention (cpu.qkv_attention: rope, cache write, attention)
    for `rows` rows at position context - 1, per dtype, the dtypes interleaved repeat by repeat."""
    cfg, bs = model.cfg, 16
    per_row = context // bs
    gen = torch.Generator().manual_seed(0)
    pool = torch.rand(2, rows * per_row + 1, cfg.num_kv_heads, bs, cfg.head_dim, generator=gen) - 0.5
    pools = {name: pool.to(dt) for name, dt in DTYPES.items()}
    table = (1 + torch.arange(rows * per_row, dtype=torch.int32)).view(rows, per_row)
    qkv = torch.randn(rows, 1, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, generator=gen)
    pos = torch.full((rows, 1), context - 1)
    angles = torch.rand(rows, 1, cfg.head_dim // 2, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    times: dict[str, list[float]] = {name: [] for name in DTYPES}
    for i in range(repeats + 2):
        for name, p in pools.items():
            c0 = time.process_time()
            cpu.qkv_attention(qkv, cos, sin, None, pos, p[0], p[1], cfg.num_heads, cfg.num_kv_heads,
                              cfg.head_dim**-0.5, blocks=table)  # fmt: skip
            if i >= 2:
                times[name].append(time.process_time() - c0)
    return {name: statistics.median(t) for name, t in times.items()}


def attention_speed(model, repeats: int) -> None:
    print(f"\n## one layer's C attention, CPU time on {torch.get_num_threads()} thread(s), median of {repeats}")
    print("| rows | context | fp32 ms | bf16 ms | fp16 ms | bf16 vs fp32 | fp16 vs fp32 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rows in (1, 16):
        for context in (256, 2048):
            t = attention_time(model, rows, context, repeats)
            f, b, h = (t[n] * 1e3 for n in DTYPES)
            print(f"| {rows} | {context} | {f:.3f} | {b:.3f} | {h:.3f} | {f / b:.2f}x | {f / h:.2f}x |", flush=True)


def capacity(model) -> None:
    print("\n## capacity of a 512 MiB pool (16-position blocks)")
    print("| KV cache | bytes a position | blocks | 2,048-token sequences at once |")
    print("|---|---:|---:|---:|")
    for name in DTYPES:
        engine = Engine(model, kv_cache_dtype=name, kv_cache_memory="512MiB")
        s = engine.stats()
        print(f"| {name} | {s['kv_bytes_per_token']} | {s['blocks_total']} | {s['blocks_total'] * 16 // 2048} |")
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gen", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--threads", type=int, help="torch / OpenMP threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = llmfn.load(args.model)
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; {args.model}")  # fmt: skip
    capacity(model)
    if not args.skip_accuracy:
        accuracy(model, args.gen)
    if not args.skip_speed:
        attention_speed(model, args.repeats)
        speed(model, args.repeats)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
