"""Batch throughput by concurrency: for N in --concurrency (1 8 16 32), N prompts submitted together
to `Engine.generate_many` (continuous batching over the paged KV cache), beside Hugging Face
transformers' batched `generate` (one left-padded batch of N) and llama.cpp (llama-cpp-python, the
same weights as an f32 GGUF): one request at a time, and --max-running sequences decoded together as
llama.cpp's server slots do, all in one process on the same weights. Greedy, every request generates exactly --gen-tokens tokens (no EOS stop).

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
    found = llama_cpp_and_gguf(model_name)
    if found is None:
        return None
    llama_cpp, gguf = found
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


def llama_cpp_slots_peer(model_name: str, slots: int):
    """(name, fn(batch, gen) -> tokens): llama.cpp decoding up to `slots` sequences in one batch, as
    its server's parallel slots do (llama-cpp-python's own server has none, so through its low-level
    API: one context with n_seq_max = slots, each prompt prefilled as its own sequence, then one
    llama_decode a step with a token of every running sequence; greedy). Requests go in waves of
    `slots`. On the f32 GGUF of the same weights; None without llama-cpp-python."""
    found = llama_cpp_and_gguf(model_name)
    if found is None:
        return None
    lc, gguf = found
    import numpy as np  # llama-cpp-python's own dependency

    model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = slots * 256, 512, 512, slots
    cp.n_threads = cp.n_threads_batch = torch.get_num_threads()
    ctx = lc.llama_init_from_model(model, cp)
    batch = lc.llama_batch_init(512, 0, slots)

    def decode(items) -> None:  # items: (token, position, sequence, wants logits)
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(i: int) -> int:
        return int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax())

    def run(prompts, gen):
        out = []
        for w in range(0, len(prompts), slots):
            group = prompts[w : w + slots]
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            tokens = []
            for seq, p in enumerate(group):
                decode([(t, j, seq, j == len(p) - 1) for j, t in enumerate(p)])
                tokens.append([greedy(-1)])
            for step in range(gen - 1):
                decode([(toks[-1], len(p) + step, seq, True) for seq, (p, toks) in enumerate(zip(group, tokens, strict=True))])
                for seq, toks in enumerate(tokens):
                    toks.append(greedy(seq))
            out += tokens
        return out

    return f"llama.cpp (llama-cpp-python {lc.__version__}, {gguf.name}), {slots} parallel slots", run


def llama_cpp_and_gguf(model_name: str):
    """(the llama_cpp module, an f32 GGUF of a built-in model's weights, written once into the temp
    dir), or None: llama-cpp-python is not installed, or the model is not a built-in alias."""
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
    return llama_cpp, gguf


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
        for peer in (llama_cpp_peer(args.model), llama_cpp_slots_peer(args.model, args.max_running)):
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
