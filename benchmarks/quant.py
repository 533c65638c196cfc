"""Weight-only int4 / int8 decode on CPU: SmolLM2-135M-Instruct in fp32, int8 and int4 beside
llama.cpp on the original Q4_1 GGUF (when llama-cpp-python is installed), with resident memory.

    python benchmarks/quant.py [--prompt-tokens 64] [--gen-tokens 128] [--threads N] [--compile]
                               [--variants fp32,int8,int4,int4/fp32-act,llama.cpp]
    python benchmarks/quant.py --threads 1 --variants q8_0,q8_0/int8-act,llama.cpp-q8_0   # int8 vs Q8_0
    python benchmarks/quant.py --variants q4_k_m,llama.cpp-q4_k_m   # a Q4_K_M file, llama.cpp's own quantizer
    python benchmarks/quant.py --kernels      # per-linear timings of the CPU kernel candidates
    python benchmarks/quant.py --accuracy     # the default (GGUF blocks) against the dequantized model

Rows: fp32 is the GGUF dequantized (quantize=None); int8 is quantize="int8" (per-channel RTN of
every linear, embedding included); int4 is quantize="int4", which is llmfn.load's default for a GGUF
(quantize="auto": the GGUF's own Q4_1 layers and Q8_0 embedding kept quantized, the same bits
llama.cpp runs), with llmfn's default activations (fp32, the exact product, kernels/cpu_quant.py);
int4/int8-act the same with int8 activations per block of 32 (int4/fp32-act names the default). q8_0 is llmfn on a Q8_0 GGUF of the same model
(quantize="auto": every linear an Int8Weight of the file's blocks; fp32 activations by default,
q8_0/int8-act with LLMFN_QUANT_ACTIVATIONS=int8) and llama.cpp-q8_0 llama.cpp on that file, which
tools/gguf_requantize.py writes from the Q4_1 GGUF (--q8-gguf; made once, in the temp folder). q4_k_m and
llama.cpp-q4_k_m: both on the Q4_K_M GGUF llama.cpp's quantizer (llama_model_quantize, through
llama-cpp-python) writes from that Q8_0 file (once, in the temp folder): Q4_K / Q6_K / Q5_0 / Q8_0
tensors, all of which llmfn keeps quantized. Each row runs in its own process, so
RSS (after loading and generating; peak from getrusage) is that row's alone; warm-up (incl.
torch.compile with --compile; llmfn's CPU default is eager) is not counted in the tok/s. On a
shared machine wall-clock tok/s depends on the load: "tok per CPU s" (one thread) is the figure
to compare across runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import llmfn  # noqa: E402, I001  (before torch: llmfn sets its OpenMP defaults)
import llmfn.loading  # noqa: E402
import peers  # noqa: E402
import torch  # noqa: E402

TEXT = (
    "The history of computing is a story of ideas made practical: from mechanical calculators to "
    "stored-program machines, from transistors to integrated circuits, each step made the next one "
    "possible. Explain, in a few paragraphs, how these developments shaped modern software. "
)
ALIAS = "smollm2-135m-instruct"
Q8_0_FILE = Path(tempfile.gettempdir()) / "llmfn-bench-SmolLM2-135M-Instruct.Q8_0.gguf"
Q4_K_M_FILE = Path(tempfile.gettempdir()) / "llmfn-bench-SmolLM2-135M-Instruct.Q4_K_M.gguf"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident set now (after loading and generating), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def weight_mb(tree) -> float:
    """Bytes held by the params pytree's tensors (a tied embedding counted once)."""
    seen, total = set(), 0

    def walk(t):
        nonlocal total
        if isinstance(t, dict):
            for v in t.values():
                walk(v)
        elif isinstance(t, list):
            for v in t:
                walk(v)
        elif isinstance(t, torch.Tensor):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        elif t is not None and hasattr(t, "__dataclass_fields__"):
            for name in t.__dataclass_fields__:
                walk(getattr(t, name))

    walk(tree)
    return total / 2**20


def timed(tokens) -> tuple[float, float, float]:
    """Drain a token iterator: (prefill wall s, decode tok/s wall, decode tok/s per CPU second)."""
    t0 = time.perf_counter()
    n = 0
    for _ in tokens:
        n += 1
        if n == 1:
            t1, c1 = time.perf_counter(), time.process_time()
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, (n - 1) / (t2 - t1), (n - 1) / (c2 - c1)


def run_llmfn(variant: str, n_prompt: int, gen: int, compile: bool | None, q8_gguf: Path = Q8_0_FILE) -> dict:
    t0 = time.perf_counter()
    weights, _, acts = variant.partition("/")  # "int4/fp32-act": int4 weights, fp32 activations
    if acts:
        os.environ["LLMFN_QUANT_ACTIVATIONS"] = acts.removesuffix("-act")
    if weights in ("q8_0", "q4_k_m"):  # that GGUF's own blocks (quantize="auto")
        model = llmfn.load(str(q8_gguf if weights == "q8_0" else Q4_K_M_FILE), quantize="auto", compile=compile)
    else:
        model = llmfn.load(ALIAS, quantize=None if weights == "fp32" else weights, compile=compile)
    from llmfn.backend import should_compile

    compiled = should_compile(model)
    load_s = time.perf_counter() - t0
    ids = model.tokenizer.encode(TEXT * (n_prompt // 20 + 1))[:n_prompt]
    run = lambda ids, n: timed(llmfn.generate(model, ids, max_tokens=n, temperature=0.0, stop_token_ids=[]))
    t0 = time.perf_counter()
    run(ids[:8], 4)  # warm-up, compile included
    warm = time.perf_counter() - t0
    prefill_s, tok_s, cpu_tok_s = max((run(ids, gen) for _ in range(2)), key=lambda r: r[1])
    return {"name": f"llmfn {variant}" + (" compiled" if compiled else " eager"), "decode_tok_s": tok_s,
            "cpu_tok_s": cpu_tok_s, "prefill_tok_s": len(ids) / prefill_s, "load_s": load_s, "warm_s": warm,
            "weights_mb": weight_mb(model.params), "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}


def llmfn_row(variant: str, args) -> dict | None:
    """One llmfn variant in its own process (so RSS is its alone)."""
    cmd = [sys.executable, __file__, "--one", variant, "--prompt-tokens", str(args.prompt_tokens),
           "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads), "--q8-gguf", str(args.q8_gguf)] + (["--compile"] if args.compile else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")), None)
    if out.returncode != 0 or line is None:
        print(f"{variant}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[4:])


def q8_0_gguf(path: Path) -> Path:
    """The Q8_0 GGUF of the Q4_1 one (tools/gguf_requantize.py), written once."""
    if not path.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
        from gguf_requantize import requantize

        from llmfn.loading.registry import ALIASES, package_path

        partial = path.with_suffix(".partial")
        requantize(package_path(ALIASES[ALIAS]), partial, "Q8_0")
        partial.rename(path)
    return path


def q4_k_m_gguf(q8_0: Path) -> Path:
    """The Q4_K_M GGUF llama.cpp's own quantizer writes from the Q8_0 one, written once."""
    if not Q4_K_M_FILE.exists():
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, True
        partial = Q4_K_M_FILE.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(q8_0).encode(), str(partial).encode(), ctypes.byref(params)):
            raise RuntimeError("llama.cpp could not write the Q4_K_M file")
        partial.rename(Q4_K_M_FILE)
    return Q4_K_M_FILE


def llama_cpp_row(args, kind: str = "Q4_1") -> dict | None:
    """llama.cpp on the original Q4_1 GGUF (or its Q8_0 or Q4_K_M version), with the user's environment
    (benchmarks/peers.py), on llmfn's token ids of the same prompt."""
    from llmfn.loading.registry import ALIASES, package_path

    files = {"Q4_1": lambda: package_path(ALIASES[ALIAS]), "Q8_0": lambda: q8_0_gguf(args.q8_gguf),
             "Q4_K_M": lambda: q4_k_m_gguf(q8_0_gguf(args.q8_gguf))}
    path = files[kind]()
    ids = llmfn.load_tokenizer(llmfn.loading.resolve(ALIAS)).encode(TEXT * (args.prompt_tokens // 20 + 1))
    r = peers.run("llama.cpp", path, ids[: args.prompt_tokens], args.gen_tokens, args.threads, llmfn.ENV_SET_BY_LLMFN)
    if r is None:
        return None
    n = r["generated"] - 1
    return {"name": f"llama.cpp {kind}", "decode_tok_s": n / r["decode_s"], "cpu_tok_s": n / r["decode_cpu_s"],
            "prefill_tok_s": r["prompt_tokens"] / r["prefill_s"], "load_s": r["load_s"], "warm_s": r["warm_s"],
            "weights_mb": path.stat().st_size / 2**20, "rss_mb": r["rss_mb"], "peak_rss_mb": r["peak_rss_mb"]}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    row = run_llmfn(args.one, args.prompt_tokens, args.gen_tokens, True if args.compile else None, args.q8_gguf)
    print("ROW " + json.dumps(row))


def kernels(threads: int) -> None:
    """Per-call timings for SmolLM2's linear shapes at decode (m = 1), weights cycled so they come
    from memory as in a real forward, CPU time of one thread (robust on a shared machine)."""
    import torch.nn.functional as F

    from llmfn.kernels import cpu_quant, quant

    torch.set_num_threads(1)
    shapes = {"wqkv": (960, 576), "w_gate_up": (3072, 576), "w_down": (576, 1536), "lm_head": (49152, 576)}

    def bench(fn, copies, n=30):
        for i in range(3):
            fn(i % copies)
        t = time.process_time()
        for i in range(n):
            fn(i % copies)
        return (time.process_time() - t) / n * 1e6

    print("| weight [n, k] | fp32 F.linear | int4 C kernel | int8 C kernel | torch int4pack (fp32 x) | "
          "torch int4pack (bf16 x) | torch int8pack | dequant + F.linear | torch.compile(dequant + F.linear) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (n, k) in shapes.items():
        row = kernel_row(n, k, bench, quant, cpu_quant, F)
        print(f"| {name} [{n}, {k}] | " + " | ".join(f"{v:.0f} us" for v in row) + " |")


def kernel_row(n, k, bench, quant, cpu_quant, F) -> list[float]:
    copies = 2 if n > 40000 else 20
    ws = [torch.randn(n, k) for _ in range(copies)]
    w4 = [quant.Int4Weight.quantize(w, 32) for w in ws]
    w8 = [quant.Int8Weight.quantize(w) for w in ws]
    x = torch.randn(1, k)
    packs = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(quant.unpack_int4(w.qweight).int(), 2) for w in w4]
    sz = torch.randn(k // 32, n, 2)
    fast = cpu_quant.available()
    fused = torch.compile(lambda x, qw, s, o: F.linear(x, quant._dequantize_int4(qw, s, o, 32)), dynamic=False)
    return [
        bench(lambda i: F.linear(x, ws[i]), copies),
        bench(lambda i: w4[i].linear(x), copies) if fast else float("nan"),
        bench(lambda i: w8[i].linear(x), copies) if fast else float("nan"),
        bench(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packs[i], 32, sz), copies, 3),
        bench(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packs[i], 32, sz.bfloat16()), copies),
        bench(lambda i: torch._weight_int8pack_mm(x, w8[i].qweight, w8[i].scales[:, 0]), copies, 5),
        bench(lambda i: F.linear(x, quant._dequantize_int4(w4[i].qweight, w4[i].scales, w4[i].offsets, 32)), copies, 5),
        bench(lambda i: fused(x, w4[i].qweight, w4[i].scales, w4[i].offsets), copies, 5),
    ]


ACCURACY_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a CPU cache works, step by step.",
    "List five fruits and the colour of each.",
    "Tell me a story about a robot who learns to paint.",
)


def decode_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """The logits [len(continuation), V] that predict each continuation token, as generate computes
    them: the prompt through the prefill forward, then one token a step through the decode forward
    (the int4 / int8 decode kernels; a prefill may take another path)."""
    from llmfn.backend import forward_for
    from llmfn.generate import cache_length
    from llmfn.models import family

    cfg, n = model.cfg, len(prompt)
    prefill, step = forward_for(model), forward_for(model, decode=True)
    rows = []
    with torch.inference_mode():
        cache = family(cfg).init_cache(cfg, 1, cache_length(n + len(continuation), cfg.max_position_embeddings),
                                       torch.float32, "cpu")  # fmt: skip
        out, cache = prefill(model.params, cfg, torch.tensor([prompt]), torch.arange(n)[None], cache,
                             logit_index=torch.tensor([n - 1]))  # fmt: skip
        for i, token in enumerate(continuation):
            rows.append(out[0, -1].clone())
            if i + 1 < len(continuation):
                out, cache = step(model.params, cfg, torch.tensor([[token]]), torch.tensor([[n + i]]), cache)
    return torch.stack(rows)


def accuracy(gen: int) -> None:
    """The default load (the GGUF's own blocks, quantize="auto") against the same bits dequantized to
    fp32 (quantize=None), per chat prompt: each greedy for `gen` tokens (EOS ignored) and where the
    two first differ; then both read the dequantized model's tokens (teacher-forced, step by step as
    generate decodes) for the largest logit difference and how often their argmax agrees. The blocks
    are the same numbers in both: what differs is the arithmetic (int4 / int8 kernels, fp32 matmuls)."""
    from llmfn.chat_template import apply_chat_template

    quantized, dense = llmfn.load(ALIAS), llmfn.load(ALIAS, quantize=None)
    print(f"# {ALIAS}: default (GGUF Q4_1 / Q8_0 blocks) vs dequantized fp32, {gen} greedy tokens per prompt, "
          f"{datetime.date.today()}, {platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}\n")
    print("| prompt | identical greedy tokens | argmax agreement (teacher-forced) | max abs logit diff | "
          "mean abs logit diff | logit range |")
    print("|---|---:|---:|---:|---:|---:|")
    agree_all, diff_all, mean_all, same_all = [], 0.0, [], []
    for prompt in ACCURACY_PROMPTS:
        ids = apply_chat_template(dense.tokenizer, dense.chat_template, [{"role": "user", "content": prompt}])
        ours, reference = (list(llmfn.generate(m, ids, max_tokens=gen, temperature=0.0, stop_token_ids=[]))
                           for m in (quantized, dense))  # fmt: skip
        same = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=True)) if a != b), gen)
        lq, ld = decode_logits(quantized, ids, reference), decode_logits(dense, ids, reference)
        assert torch.equal(ld.argmax(-1), torch.tensor(reference)), "the step loop must reproduce generate"
        agree = (lq.argmax(-1) == ld.argmax(-1)).float().mean().item()
        diff, mean = (lq - ld).abs().max().item(), (lq - ld).abs().mean().item()
        agree_all.append(agree)
        same_all.append(same)
        mean_all.append(mean)
        diff_all = max(diff_all, diff)
        print(f"| {prompt} | {same} / {gen} | {agree:.1%} | {diff:.2e} | {mean:.2e} | "
              f"{ld.min().item():.1f} .. {ld.max().item():.1f} |")
    print(f"| all {len(ACCURACY_PROMPTS)} | {sum(same_all)} / {gen * len(same_all)} | "
          f"{sum(agree_all) / len(agree_all):.1%} | {diff_all:.2e} | {sum(mean_all) / len(mean_all):.2e} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, help="tokens generated (default 128; 200 with --accuracy)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="torch.compile the llmfn rows (default: llmfn's choice)")
    parser.add_argument("--variants", default="fp32,int8,int4,llama.cpp")
    parser.add_argument("--kernels", action="store_true", help="time the CPU kernel candidates per linear")
    parser.add_argument("--accuracy", action="store_true",
                        help="the default load (GGUF blocks) against the dequantized model: logits and greedy tokens")
    parser.add_argument("--q8-gguf", type=Path, default=Q8_0_FILE,
                        help="the Q8_0 GGUF of the q8_0 variants (written from the Q4_1 one when missing)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.gen_tokens = args.gen_tokens or (200 if args.accuracy else 128)
    if args.one:
        return child(args)
    if args.kernels:
        return kernels(args.threads)
    if args.accuracy:
        torch.set_num_threads(args.threads)
        return accuracy(args.gen_tokens)

    rows = []
    if "q8_0" in args.variants or "q4_k_m" in args.variants:
        q8_0_gguf(args.q8_gguf)
    if "q4_k_m" in args.variants:
        q4_k_m_gguf(args.q8_gguf)
    for variant in args.variants.split(","):
        if variant.startswith("llama.cpp"):
            row = llama_cpp_row(args, variant.removeprefix("llama.cpp").removeprefix("-").upper() or "Q4_1")
        else:
            row = llmfn_row(variant, args)
        if row is not None:
            rows.append(row)

    print(f"\n# SmolLM2-135M-Instruct decode on CPU, {datetime.date.today()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads}, llmfn with GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT')}, peers without "
          f"llmfn's defaults ({', '.join(llmfn.ENV_SET_BY_LLMFN) or 'none set'}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"# prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated, greedy, best of 2\n")
    print("| runtime | decode tok/s | decode tok per CPU s | prefill tok/s | weights MiB | RSS MiB | peak RSS MiB "
          "| load s | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['decode_tok_s']:.1f} | {r['cpu_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | "
              f"{r['weights_mb']:.0f} | {r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} | {r['warm_s']:.1f} |")
    print("\n(decode tok per CPU s: generated tokens over the process's CPU time; with one thread it is the "
          "speed on an idle core, whatever else the machine runs)")
    by = {r["name"].split()[1] if r["name"].startswith("llmfn") else r["name"].replace(" Q4_1", ""): r for r in rows}
    if "int4" in by and "llama.cpp" in by:
        print(f"\nllmfn int4 / llama.cpp Q4_1 decode: {by['int4']['decode_tok_s'] / by['llama.cpp']['decode_tok_s']:.2f}x")
    for name in ("q8_0", "q8_0/int8-act"):
        if name in by and "llama.cpp Q8_0" in by:
            mine, peer = by[name], by["llama.cpp Q8_0"]
            print(f"llmfn {name} / llama.cpp Q8_0 decode: {mine['decode_tok_s'] / peer['decode_tok_s']:.2f}x wall, "
                  f"{mine['cpu_tok_s'] / peer['cpu_tok_s']:.2f}x per CPU second")
    if "int4" in by and "fp32" in by:
        print(f"llmfn int4 / llmfn fp32 decode: {by['int4']['decode_tok_s'] / by['fp32']['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
