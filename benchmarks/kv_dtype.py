"""The KV cache dtype (issue 19): a bf16 / fp16 cache against the exact fp32 default, on SmolLM2-135M
as the default server loads it (its Q4_1 blocks, fp32 activations).

1. accuracy: a text teacher-forced one token a step (the fused C decode path the engine uses), the
   largest |logit difference| to the fp32 cache's logits over all positions and the text's
   perplexity; greedy generation of --gen tokens from a few prompts through the Engine: how many
   tokens equal the fp32 cache's before the first that differs.
2. speed: one decode step (the fused C layers over a paged pool) of 1 and 16 rows at contexts of 256
   and 2,048 positions; median wall and CPU (process) time of --repeats steps.
3. capacity: the blocks and the 2,048-token sequences a 512 MiB pool holds.

    python benchmarks/kv_dtype.py [--model smollm2-135m-instruct] [--gen 200] [--repeats 20] [--skip-accuracy]
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


def step_time(model, dtype: torch.dtype, rows: int, context: int, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one decode step of `rows` rows at position context - 1."""
    cfg, bs = model.cfg, 16
    per_row = context // bs
    cache = llama.init_cache(cfg, rows * per_row + 1, bs, dtype)
    pattern = (torch.rand(1 << 20, generator=torch.Generator().manual_seed(0)) - 0.5).to(dtype)
    for t in (cache.k, cache.v):  # keys and values of a plausible size (attention's cost ignores them)
        flat = t.view(-1)
        for i in range(0, flat.numel(), pattern.numel()):
            flat[i : i + pattern.numel()] = pattern[: flat.numel() - i]
    table = (1 + torch.arange(rows * per_row, dtype=torch.int32)).view(rows, per_row)
    cache = cache._replace(blocks=table)
    tok = torch.randint(0, cfg.vocab_size, (rows, 1))
    pos = torch.full((rows, 1), context - 1)
    wall, cpu = [], []
    with torch.inference_mode():
        for i in range(repeats + 3):
            w0, c0 = time.perf_counter(), time.process_time()
            fused_forward(model.params, cfg, tok, pos, cache)
            if i >= 3:
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def speed(model, repeats: int) -> None:
    print(f"\n## decode step (fused C layers, paged pool), median of {repeats}; tok/s = rows / wall time")
    print("| rows | context | KV cache | step ms (wall) | step ms (CPU) | tok/s | vs fp32 |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for rows in (1, 16):
        for context in (256, 2048):
            base = None
            for name, dt in DTYPES.items():
                wall, cpu = step_time(model, dt, rows, context, repeats)
                base = base or wall
                print(f"| {rows} | {context} | {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {rows / wall:.1f} | "
                      f"{base / wall:.2f}x |", flush=True)  # fmt: skip


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
    args = ap.parse_args()
    model = llmfn.load(args.model)
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; {args.model}")  # fmt: skip
    capacity(model)
    if not args.skip_accuracy:
        accuracy(model, args.gen)
    if not args.skip_speed:
        speed(model, args.repeats)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
