"""Grammar-constrained decoding cost on SmolLM2-135M (llmfn.constraints over llguidance), all in one
process and on the same prompt: decode tok/s with a json_schema constraint beside the same decode
unconstrained (llmfn.generate, and the engine with --batch requests at once), the compile time of a
tool-sized schema, and the per-token mask cost (llguidance's mask, then applying it to the logits).

    python benchmarks/constrained.py [--gen-tokens 128] [--batch 8] [--rounds 3]

Each decode figure is the best of --rounds runs after a warm-up, constrained and unconstrained runs
alternating. The schema's minItems keeps the constrained answer going for all --gen-tokens tokens
(EOS ignored in both), so both runs decode the same number of tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import llmfn  # noqa: E402
from llmfn import constraints  # noqa: E402
from llmfn.chat_template import apply_chat_template  # noqa: E402
from llmfn.engine import Engine, GenerationRequest  # noqa: E402
from llmfn.perf import measure  # noqa: E402
from llmfn.sampling import apply_token_bitmask  # noqa: E402

QUESTION = "List twenty European cities as JSON: for each its name, country, population and whether it is a capital."
CITIES = {
    "type": "object",
    "properties": {"cities": {"type": "array", "minItems": 20, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "country", "population", "capital"],
        "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                       "population": {"type": "integer"}, "capital": {"type": "boolean"}}}}},
    "required": ["cities"],
    "additionalProperties": False,
}  # fmt: skip


def tool_schema(variant: int) -> dict:
    """An OpenAI-style tool's parameters (a dozen fields, nesting, enums, arrays, bounds); `variant`
    changes a description so every compile misses the cache."""
    return {
        "type": "object",
        "description": f"Book a flight (variant {variant})",
        "properties": {
            "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "return_date": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "passengers": {"type": "array", "minItems": 1, "maxItems": 9, "items": {
                "type": "object", "required": ["name", "age"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64},
                               "age": {"type": "integer", "minimum": 0, "maximum": 120},
                               "seat": {"enum": ["window", "aisle", "middle"]}}}},
            "cabin": {"enum": ["economy", "premium", "business", "first"]},
            "max_price": {"type": "number", "minimum": 0},
            "currency": {"const": "EUR"},
            "flexible": {"type": "boolean"},
            "notes": {"type": "string", "maxLength": 200},
        },
        "required": ["origin", "destination", "date", "passengers", "cabin"],
        "additionalProperties": False,
    }  # fmt: skip


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or platform.machine()


def decode_rates(model, ids, gen, rounds) -> tuple[float, float]:
    """Best decode tok/s of llmfn.generate, unconstrained and constrained, alternating."""
    schema = constraints.json_schema(CITIES)
    measure(model, ids, max_tokens=gen)
    measure(model, ids, max_tokens=gen, response_format=schema)
    plain, guided = [], []
    for _ in range(rounds):
        plain.append(measure(model, ids, max_tokens=gen).decode_tok_s)
        report = measure(model, ids, max_tokens=gen, response_format=schema)
        assert report.generated_tokens == gen, "the constrained answer ended early"
        guided.append(report.decode_tok_s)
    return max(plain), max(guided)


def engine_rates(model, ids, gen, batch, rounds) -> tuple[float, float]:
    """Best generated tok/s of `batch` requests through the engine, none or all constrained."""
    schema = constraints.json_schema(CITIES)
    rates = {None: [], schema: []}
    with Engine(model, max_running=batch) as engine:
        for i, constraint in enumerate((None, schema) * (rounds + 1)):
            reqs = [GenerationRequest(ids, gen, stop_token_ids=(), constraint=constraint) for _ in range(batch)]
            t0 = time.perf_counter()
            results = engine.generate_many(reqs)
            elapsed = time.perf_counter() - t0
            assert all(r.completion_tokens == gen for r in results), "an answer ended early"
            if i >= 2:  # the first pass of each is the warm-up
                rates[constraint].append(batch * gen / elapsed)
    return max(rates[None]), max(rates[schema])


def compile_times(tok, n=30) -> tuple[float, float]:
    """(first compile incl. the tokenizer adapter, median cold compile of a tool schema) in ms."""
    t0 = time.perf_counter()
    constraints.compile(constraints.json_schema(tool_schema(-1)), tok)
    first = time.perf_counter() - t0
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        constraints.compile(constraints.json_schema(tool_schema(i)), tok)
        times.append(time.perf_counter() - t0)
    return first * 1e3, statistics.median(times) * 1e3


def mask_times(model, ids, gen) -> tuple[float, float, float]:
    """Per token along a real constrained answer, in us: llguidance's mask (median, mean) and applying it
    to [1, V] logits (median)."""
    schema = constraints.json_schema(CITIES)
    tokens = list(llmfn.generate(model, ids, max_tokens=gen, temperature=0.0, stop_token_ids=[], response_format=schema))
    matcher = constraints.compile(schema, model.tokenizer).matcher(model.tokenizer.eos_ids)
    V = model.cfg.vocab_size
    row = torch.zeros(1, constraints.bitmask_words(V), dtype=torch.int32)
    logits = torch.randn(1, V)
    compute, apply = [], []
    for t in tokens:
        t0 = time.perf_counter()
        matcher.allowed(row[0])
        t1 = time.perf_counter()
        apply_token_bitmask(logits, row)
        t2 = time.perf_counter()
        matcher.advance(t)
        compute.append(t1 - t0)
        apply.append(t2 - t1)
    return statistics.median(compute) * 1e6, statistics.mean(compute) * 1e6, statistics.median(apply) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="engine requests at once (0: skip the engine)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model = llmfn.load(args.model)
    tok = model.tokenizer
    ids = apply_chat_template(tok, model.chat_template, [{"role": "user", "content": QUESTION}])
    first_ms, compile_ms = compile_times(tok)  # first: the tokenizer adapter is built here
    sample = llmfn.chat(model, [{"role": "user", "content": QUESTION}], max_tokens=60, response_format=CITIES)
    plain, guided = decode_rates(model, ids, args.gen_tokens, args.rounds)
    compute_med, compute_mean, apply_med = mask_times(model, ids, args.gen_tokens)

    print(f"# constrained decoding, {args.model}, {datetime.date.today()}, {cpu_name()}, "
          f"{torch.get_num_threads()} threads, llguidance {__import__('llguidance').__version__}")  # fmt: skip
    print(f"# prompt {len(ids)} tokens, {args.gen_tokens} generated, greedy, EOS ignored; "
          f"best of {args.rounds} after a warm-up")  # fmt: skip
    print(f"# the constrained answer begins: {json.dumps(sample.text()[:70])}...")
    print("| what | unconstrained | json_schema | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| llmfn.generate decode tok/s | {plain:.1f} | {guided:.1f} | {guided / plain:.2f}x |")
    if args.batch:
        e_plain, e_guided = engine_rates(model, ids, args.gen_tokens, args.batch, args.rounds)
        print(f"| engine, {args.batch} requests, generated tok/s | {e_plain:.1f} | {e_guided:.1f} | "
              f"{e_guided / e_plain:.2f}x |")  # fmt: skip
    print(f"\ncompile, tool-sized schema ({len(json.dumps(tool_schema(0)))} chars of JSON): {compile_ms:.2f} ms "
          f"median of 30 cold compiles; the first, with the tokenizer adapter ({len(tok)} tokens): {first_ms:.0f} ms")
    print(f"mask per token: llguidance {compute_med:.0f} us median ({compute_mean:.0f} us mean), "
          f"applied to the [1, {model.cfg.vocab_size}] logits {apply_med:.0f} us median")  # fmt: skip


if __name__ == "__main__":
    main()
