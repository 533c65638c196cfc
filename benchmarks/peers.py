"""The peer runtimes the benchmarks compare llmfn with, each timed in a process of its own.

A peer runs with the user's environment, not llmfn's import-time defaults (GOMP_SPINCOUNT:
`llmfn.ENV_SET_BY_LLMFN`), and imports nothing of llmfn or torch before its own
libraries: llama.cpp and torch share one libgomp, which reads the wait policy once, when loaded.
(Measured on 2 cores: llama.cpp decodes SmolLM2 Q4_1 at ~120 tok/s with libgomp's default policy,
~90 under PASSIVE, so a shared process would have handicapped it.)

    python benchmarks/peers.py llama.cpp MODEL.gguf IDS.json GEN THREADS
    python benchmarks/peers.py transformers FOLDER IDS.json GEN THREADS

print one line "ROW {json}": prompt_tokens, generated, prefill_s, decode_s, decode_cpu_s, load_s,
warm_s, rss_mb, peak_rss_mb; the best prefill and the best decode of three runs after a warm-up
(as the llmfn rows). Greedy decoding; the token ids are given, so every runtime reads the same
prompt.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(kind: str, model: Path, ids: list[int], gen: int, threads: int, env_set_by_llmfn=()) -> dict | None:
    """Time `kind` in a child process (None when its library is not installed)."""
    env = {k: v for k, v in os.environ.items() if k not in env_set_by_llmfn}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    try:
        cmd = [sys.executable, __file__, kind, str(model), f.name, str(gen), str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")), None)
    if out.returncode != 0 or line is None:
        print(f"{kind}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    row = json.loads(line[4:])
    if row is None:
        print(out.stderr.strip(), file=sys.stderr)
    return row


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _timed(step_prefill, step_decode, n_prompt: int, gen: int) -> dict:
    """prefill (through the first token), then gen - 1 decode steps: wall and CPU seconds."""
    t0 = time.perf_counter()
    token = step_prefill()
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(gen - 1):
        token = step_decode(token)
    t2, c2 = time.perf_counter(), time.process_time()
    return {"prompt_tokens": n_prompt, "generated": gen, "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_cpu_s": c2 - c1}  # fmt: skip


def _quantized_on_avx512(model: str) -> bool:
    """Whether llama-cpp-python 0.3.36's crash applies: a quantized (not f32 / f16) GGUF on an AVX-512
    CPU, where its prefill of several tokens in one batch segfaults (seen with SmolLM2's Q4_1 on an
    AVX-512 Xeon); decode, one token a batch, is fine."""
    import gguf

    field = gguf.GGUFReader(model).fields.get("general.file_type")
    float_file = field is not None and field.contents() in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16)
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    return not float_file and "avx512f" in flags.split()


def _llama_cpp(model: str, ids: list[int], gen: int, threads: int):
    from llama_cpp import Llama

    # n_batch=1 where the batched prefill crashes (see above): its prefill then runs token by token,
    # so its prefill figure is not llama.cpp's best there; decode is unaffected.
    n_batch = 1 if _quantized_on_avx512(model) else 512
    if n_batch == 1:
        print("llama.cpp: n_batch=1 (quantized GGUF on AVX-512: batched prefill segfaults in 0.3.36)", file=sys.stderr)
    llm = Llama(model, n_ctx=len(ids) + gen + 16, n_threads=threads, n_batch=n_batch, verbose=False)

    def prefill(ids=ids):
        llm.reset()
        llm.eval(ids)
        return llm.sample(temp=0.0)

    def decode(token):
        llm.eval([token])
        return llm.sample(temp=0.0)

    return prefill, decode


def _transformers(folder: str, ids: list[int], gen: int, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    state = {}

    def prefill(ids=ids):
        out = model(torch.tensor([ids]), past_key_values=DynamicCache(config=model.config), use_cache=True)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def decode(token):
        out = model(torch.tensor([[token]]), past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    return prefill, decode


def main() -> None:
    kind, model, ids_file, gen, threads = sys.argv[1:6]
    ids, gen, threads = json.loads(Path(ids_file).read_text()), int(gen), int(threads)
    build = {"llama.cpp": _llama_cpp, "transformers": _transformers}[kind]
    try:
        t0 = time.perf_counter()
        prefill, decode = build(model, ids, gen, threads)
    except ImportError as e:
        print(f"{kind} is not installed ({e}): make bench-setup", file=sys.stderr)
        print("ROW null")
        return
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _timed(lambda: prefill(ids[:8]), decode, 8, 4)  # warm-up
    warm_s = time.perf_counter() - t0
    runs = [_timed(prefill, decode, len(ids), gen) for _ in range(3)]
    best = {**min(runs, key=lambda r: r["decode_s"]), "prefill_s": min(r["prefill_s"] for r in runs)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ROW " + json.dumps({**best, "load_s": load_s, "warm_s": warm_s, "rss_mb": _rss_mb(), "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
