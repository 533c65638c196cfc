"""Offline batch throughput: N prompts through `Engine.generate_many` (continuous batching) beside the
same prompts one at a time through `llmfn.generate`, and beside Hugging Face transformers' batched
`generate` (left-padded, static batches) on the same weights, all in one process. Greedy, every
request generates exactly --gen-tokens tokens (no EOS stop), eager (uncompiled) llmfn decode.

    python benchmarks/engine.py [--model smollm2-135m-instruct] [--prompts 16] [--gen-tokens 64]
                                [--max-running 8] [--slot-len 256] [--skip-peer] [--threads N]

Prints generated tokens/s per runtime, the speed-up over one at a time, and how many engine outputs
equal the one-at-a-time tokens (the engine's fixed shapes differ from generate's, so only last-bit
near-ties could flip an argmax). Each figure is one timed pass after a warm-up pass.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import llmfn  # noqa: E402
from llmfn.engine import Engine, GenerationRequest  # noqa: E402
from llmfn.loading import resolve  # noqa: E402

TEXT = (
    "The history of computing is a story of ideas made practical: from mechanical calculators to "
    "stored-program machines, from transistors to integrated circuits, each step made the next one "
    "possible. Explain, in a few paragraphs, how these developments shaped modern software. Consider "
    "operating systems, compilers, networks and databases, and the people who built them. "
)


def prompts(model, n: int) -> list[list[int]]:
    """n different prompts of 16 .. 112 tokens (cut from a text at different offsets)."""
    ids = model.tokenizer.encode(TEXT * 4)
    return [ids[3 * i : 3 * i + 16 + (i * 37) % 97] for i in range(n)]


def one_at_a_time(model, batch: list[list[int]], gen: int) -> list[list[int]]:
    return [list(llmfn.generate(model, p, max_tokens=gen, temperature=0.0, stop_token_ids=[])) for p in batch]


def engine_run(engine: Engine, batch: list[list[int]], gen: int) -> list[list[int]]:
    reqs = [GenerationRequest(p, gen, stop_token_ids=()) for p in batch]
    return [r.token_ids for r in engine.generate_many(reqs)]


def transformers_peer(folder: Path, max_batch: int):
    """(name, fn(batch, gen) -> tokens) running HF generate on static left-padded batches."""
    import transformers
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.inference_mode()
    def run(batch, gen):
        out = []
        for i in range(0, len(batch), max_batch):
            group = batch[i : i + max_batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            new = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen, min_new_tokens=gen,
                              do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
            out += new[:, width:].tolist()
        return out

    return f"transformers {transformers.__version__} generate, batches of {max_batch}", run


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias or checkpoint folder")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--slot-len", type=int, default=256, help="KV positions per sequence slot")
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--skip-peer", action="store_true", help="no transformers row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = resolve(args.model)
    model = llmfn.load(folder, compile=False)
    batch = prompts(model, args.prompts)
    gen = args.gen_tokens
    engine = Engine(model, max_running=args.max_running, max_cache_tokens=args.slot_len * args.max_running,
                    prefill_chunk=args.prefill_chunk)  # fmt: skip
    engine.start()
    rows = []
    warm = batch[:2]
    one_at_a_time(model, warm, 4)
    rows.append(("llmfn.generate, one at a time", *timed(one_at_a_time, model, batch, gen)))
    engine_run(engine, warm, 4)
    rows.append((f"llmfn Engine.generate_many, max_running {args.max_running}",
                 *timed(engine_run, engine, batch, gen)))  # fmt: skip
    stats = engine.stats()
    engine.shutdown()
    if not args.skip_peer:
        name, peer = transformers_peer(folder, args.max_running)
        peer(warm, 4)
        rows.append((name, *timed(peer, batch, gen)))

    base_s, base_tokens = rows[0][1], rows[0][2]
    same = sum(a == b for a, b in zip(rows[1][2], base_tokens, strict=True))
    total = sum(len(t) for t in base_tokens)
    print(
        f"# engine throughput: {folder.name}, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"# {len(batch)} prompts of {min(map(len, batch))}-{max(map(len, batch))} tokens, {gen} generated each "
        f"(greedy, no EOS), fp32 eager; engine slot {stats['slot_len']} positions, "
        f"KV cache {stats['cache_bytes'] / 2**20:.0f} MiB, {stats['steps']} steps\n"
    )
    print("| runtime | generated tok/s | wall s | vs one at a time |")
    print("|---|---:|---:|---:|")
    for name, seconds, tokens in rows:
        n = sum(len(t) for t in tokens)
        print(f"| {name} | {n / seconds:.1f} | {seconds:.2f} | {base_s / seconds * n / total:.2f}x |")
    print(f"\nengine greedy outputs equal to llmfn.generate's: {same}/{len(batch)}")


if __name__ == "__main__":
    main()
