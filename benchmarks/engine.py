"""Batch throughput by concurrency: for N in --concurrency (1 8 16 32), N prompts submitted together
to `Engine.generate_many` (continuous batching over the paged KV cache), beside Hugging Face
transformers' batched `generate` (one left-padded batch of N) and llama.cpp (llama-cpp-python, the
same weights as a GGUF, one request at a time: its server has no parallel slots), all in one process
on the same weights. Greedy, every request generates exactly --gen-tokens tokens (no EOS stop).

    python benchmarks/engine.py [--model smollm2-135m-instruct] [--concurrency 1 8 16 32] [--gen-tokens 64]
                                [--max-running 16] [--skip-peer] [--threads N]

Prints aggregate generated tokens/s per runtime and N, and the speed-up over N = 1. Each figure is
one timed pass after a warm-up pass.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    ids = model.tokenizer.encode(TEXT * 8)
    return [ids[3 * i : 3 * i + 16 + (i * 37) % 97] for i in range(n)]


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
        for i in range(0, len(batch), max_batch):  # one left-padded batch per max_batch prompts
            group = batch[i : i + max_batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            new = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen, min_new_tokens=gen,
                              do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
            out += new[:, width:].tolist()
        return out

    return f"transformers {transformers.__version__} generate, batches of {max_batch}", run


def llama_cpp_peer(model_name: str):
    """(name, fn(batch, gen) -> tokens) through llama-cpp-python on an f32 GGUF of the same weights
    (SmolLM2 only), one request at a time, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from decode import write_f32_gguf

    from llmfn.loading.registry import ALIASES, package_path

    if model_name not in ALIASES:
        return None
    gguf = Path(tempfile.gettempdir()) / f"{model_name}-f32.gguf"
    if not gguf.exists():
        write_f32_gguf(package_path(ALIASES[model_name]), gguf)
    llm = llama_cpp.Llama(str(gguf), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)

    def run(batch, gen):
        out = []
        for p in batch:
            llm.reset()
            tokens = []
            for t in llm.generate(p, temp=0.0, top_k=1):
                tokens.append(t)
                if len(tokens) == gen:
                    break
            out.append(tokens)
        return out

    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, {gguf.name}), sequential", run


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias or checkpoint folder")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--skip-peer", action="store_true", help="no transformers / llama.cpp rows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = resolve(args.model)
    model = llmfn.load(folder, compile=False)
    gen = args.gen_tokens
    engine = Engine(model, max_running=args.max_running, prefill_chunk=args.prefill_chunk)
    engine.start()
    runtimes = [(f"llmfn Engine (max_running {args.max_running}, paged KV)", partial(engine_run, engine))]
    if not args.skip_peer:
        runtimes.append(transformers_peer(folder, max(args.concurrency)))
        peer = llama_cpp_peer(args.model)
        if peer is not None:
            runtimes.append(peer)
    table = {}
    for name, fn in runtimes:
        fn(prompts(model, 2), 4)  # warm-up
        for n in args.concurrency:
            batch = prompts(model, n)
            seconds, tokens = timed(fn, batch, gen)
            table[name, n] = sum(len(t) for t in tokens) / seconds
    stats = engine.stats()
    engine.shutdown()
    print(
        f"# engine throughput by concurrency: {folder.name}, {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"# prompts of 16-112 tokens, {gen} generated each (greedy, no EOS), fp32 weights; engine KV pool "
          f"{stats['kv_cache_bytes'] / 2**20:.0f} MiB in {stats['blocks_total']} blocks, {stats['preemptions']} "
          f"preemptions\n")  # fmt: skip
    ns = args.concurrency
    print("| runtime | " + " | ".join(f"N={n} tok/s" for n in ns) + f" | N={ns[-1]} vs N={ns[0]} |")
    print("|---|" + "---:|" * (len(ns) + 1))
    for name, _ in runtimes:
        cells = " | ".join(f"{table[name, n]:.1f}" for n in ns)
        print(f"| {name} | {cells} | {table[name, ns[-1]] / table[name, ns[0]]:.1f}x |")


if __name__ == "__main__":
    main()
