"""Decoder perf report for SmolLM2-135M on this machine: llmfn (fp32, bf16, optionally compiled)
beside Hugging Face transformers on the same weights, and llama.cpp (an f32 GGUF of the same
weights, and the original Q4_1) when llama-cpp-python is installed (`make bench-setup`). Peers run
in their own processes with the user's environment (benchmarks/peers.py). Prints one table.
int4 / int8 against llama.cpp's Q4_1 is benchmarks/quant.py, which runs every variant in a process
of its own (int4 measured 5-15% slower in a process that also held the fp32 and bf16 models).

    python benchmarks/decode.py [--prompt-tokens 128] [--gen-tokens 128]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

# isort: off
import llmfn  # before torch: llmfn's OpenMP defaults then apply to its rows
import torch

# isort: on
import peers

from llmfn.loading import resolve
from llmfn.perf import PerfReport, measure

TEXT = (
    "The history of computing is a story of ideas made practical: from mechanical calculators to "
    "stored-program machines, from transistors to integrated circuits, each step made the next one "
    "possible. Explain, in a few paragraphs, how these developments shaped modern software. "
)


def prompt_ids(model, n: int) -> list[int]:
    ids = model.tokenizer.encode(TEXT * (n // 20 + 1))
    return ids[:n]


def llmfn_row(name, model, ids, gen) -> tuple[str, PerfReport, float]:
    """The best prefill and the best decode of three runs after a warm-up at the same shapes (compile
    included when on), as the peers (benchmarks/peers.py)."""
    t0 = time.perf_counter()
    measure(model, ids, max_tokens=gen)
    warm = time.perf_counter() - t0
    runs = [measure(model, ids, max_tokens=gen) for _ in range(3)]
    best = max(runs, key=lambda r: r.decode_tok_s)
    return name, PerfReport.of(len(ids), gen, min(r.prefill_s for r in runs), best.decode_s), warm


def write_f32_gguf(source: Path, out: Path) -> None:
    """The same weights as an f32 GGUF for llama.cpp: every tensor dequantized, metadata copied."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out), arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), value_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def peer_rows(folder: Path, ids, gen) -> list[tuple[str, PerfReport, float]]:
    """transformers on the checkpoint folder, llama.cpp on an f32 GGUF of the same weights and on the
    original Q4_1 GGUF, each in its own process with the user's environment (benchmarks/peers.py)."""
    from llmfn.loading.registry import ALIASES, package_path

    q4 = package_path(ALIASES["smollm2-135m-instruct"])
    f32 = Path(tempfile.gettempdir()) / "smollm2-135m-f32.gguf"
    if not f32.exists():
        write_f32_gguf(q4, f32)
    rows = []
    for name, kind, model in (("transformers float32 eager", "transformers", folder),
                              ("llama.cpp f32", "llama.cpp", f32), ("llama.cpp Q4_1", "llama.cpp", q4)):  # fmt: skip
        r = peers.run(kind, model, ids, gen, torch.get_num_threads(), llmfn.ENV_SET_BY_LLMFN)
        if r is not None:
            rows.append((name, PerfReport.of(r["prompt_tokens"], r["generated"], r["prefill_s"], r["decode_s"]), r["warm_s"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating who runs first (default 2)")
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile'd decode step")
    args = parser.parse_args()

    folder = resolve("smollm2-135m-instruct")
    models = {
        "llmfn fp32 (default: eager)": llmfn.load(folder, compile=False),
        "llmfn bf16 (eager)": llmfn.load(folder, dtype="bfloat16", compile=False),
    }
    if args.compiled:
        models["llmfn fp32 compiled"] = llmfn.load(folder, compile=True)
    ids = prompt_ids(models["llmfn fp32 (default: eager)"], args.prompt_tokens)
    gen = args.gen_tokens

    def ours():
        return [llmfn_row(name, model, ids, gen) for name, model in models.items()]

    def theirs():
        return [] if args.skip_peers else peer_rows(folder, ids, gen)

    # The VM's speed drifts within a run: round r runs llmfn first when r is even, the peers first
    # when odd, and each runtime keeps its best prefill and best decode over the rounds.
    best: dict[str, tuple[PerfReport, float]] = {}
    for r in range(args.rounds):
        for name, rep, warm in ours() + theirs() if r % 2 == 0 else theirs() + ours():
            old = best.get(name, (rep, warm))[0]
            prefill = min(rep.prefill_s, old.prefill_s)
            decode = min(rep.decode_s, old.decode_s)
            best[name] = (PerfReport.of(rep.prompt_tokens, rep.generated_tokens, prefill, decode), warm)
    rows = [(name, rep, warm) for name, (rep, warm) in best.items()]

    env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE")}
    print(f"# llmfn ran with {env} (its defaults unless the user set them); each peer ran in its own process "
          f"without llmfn's defaults ({', '.join(llmfn.ENV_SET_BY_LLMFN) or 'none were set'})")
    print(f"# SmolLM2-135M-Instruct decode, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"# prompt {len(ids)} tokens, {gen} generated, greedy; best prefill and best decode of 3 runs after a "
          f"warm-up (incl. compile), over {args.rounds} round(s) alternating which side runs first, for every "
          f"runtime\n")
    print("| runtime | prefill tok/s | prefill s | decode tok/s | decode s | avg tok/s | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r, warm in rows:
        print(f"| {name} | {r.prompt_tokens / r.prefill_s:.0f} | {r.prefill_s:.3f} | {r.decode_tok_s:.1f} | "
              f"{r.decode_s:.2f} | {r.avg_tok_s:.1f} | {warm:.1f} |")
    base = {name: r for name, r, _ in rows}
    hf = base.get("transformers float32 eager")
    if hf:
        ours = base["llmfn fp32 (default: eager)"]
        print(f"\nllmfn fp32 / transformers fp32: decode {ours.decode_tok_s / hf.decode_tok_s:.2f}x, "
              f"prefill {(ours.prompt_tokens / ours.prefill_s) / (hf.prompt_tokens / hf.prefill_s):.2f}x")
    fp32, bf16, cpp = (base.get(k) for k in ("llmfn fp32 (default: eager)", "llmfn bf16 (eager)", "llama.cpp f32"))
    print(f"llmfn bf16 / llmfn fp32: decode {bf16.decode_tok_s / fp32.decode_tok_s:.2f}x (bf16 weights, fp32 "
          "activations: kernels/bf16.py)")
    if cpp:
        print(f"llmfn fp32 / llama.cpp f32: decode {fp32.decode_tok_s / cpp.decode_tok_s:.2f}x")


if __name__ == "__main__":
    main()
