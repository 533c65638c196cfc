"""Speculative decoding on SmolLM2-135M-Instruct: llmfn's decode tok/s with and without n-gram
(prompt lookup) speculation, fp32 and int4, in the same run and on the same prompts, beside
transformers' own prompt lookup (`generate(prompt_lookup_num_tokens=...)`, fp32) with and without.

    python benchmarks/speculative.py [--gen-tokens 192] [--rounds 2] [--quick] [--json out.json]
                                     [--threads 1 --clock cpu]

Prompts: input-grounded ones, whose answer copies spans of the prompt (rename a variable in a
~300-token code snippet; quote the sentences of a paragraph that answer a question; continue a list
that repeats its pattern), and open-ended chat, where drafts mostly fail and speculation must not
slow decoding down. Greedy; each reply ends at EOS or --gen-tokens. Decode tok/s counts tokens 2..n
over the time from the first token to the last (prefill apart). Each figure is the best of --rounds,
the runs with and without speculation alternating. llmfn's output with speculation is checked to be
token for token the output without it (the "same" column). `--threads 1 --clock cpu` times the
process's CPU seconds on one thread: the speed on an idle core, whatever else shares the machine.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import llmfn  # noqa: E402
from llmfn.chat_template import apply_chat_template  # noqa: E402
from llmfn.generate import eos_ids  # noqa: E402
from llmfn.loading.registry import ALIASES, package_path  # noqa: E402

CODE = '''import csv
from dataclasses import dataclass


@dataclass
class Order:
    customer: str
    amount: float
    country: str


def load_orders(path):
    data = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            data.append(Order(row["customer"], float(row["amount"]), row["country"]))
    return data


def total_by_country(data):
    totals = {}
    for order in data:
        totals[order.country] = totals.get(order.country, 0.0) + order.amount
    return totals


def top_customers(data, n=3):
    spent = {}
    for order in data:
        spent[order.customer] = spent.get(order.customer, 0.0) + order.amount
    ranked = sorted(spent.items(), key=lambda item: item[1], reverse=True)
    return ranked[:n]


def main(path):
    data = load_orders(path)
    for country, total in sorted(total_by_country(data).items()):
        print(f"{country}: {total:.2f}")
    for customer, total in top_customers(data):
        print(f"{customer} spent {total:.2f}")
'''

PARAGRAPH = (
    "The river town of Alder Bend grew up around a mill built in 1852. The mill ground wheat for farms "
    "along the valley until a flood destroyed its wheel in 1911. Afterwards the town turned to timber, "
    "and three sawmills opened on the east bank within a decade. The railway arrived in 1923, bringing "
    "visitors who came to fish for trout in the cold upper river. A second flood in 1948 closed two of "
    "the sawmills for good. Today the old mill is a museum, and its rebuilt wheel turns again every "
    "summer. The town council meets in the former station house, which still has its original clock."
)

SCHEDULE = "".join(
    f"{day}: stand-up at 9:00, design review at 11:00, lunch at 12:30, code review at 15:00, gym at 18:00\n"
    for day in ("Monday", "Tuesday", "Wednesday")
)

PROMPTS = {
    # name: (kind, user message; a str in a tuple is a raw completion prompt, no chat template)
    "rename-variable": ("grounded", "Rename the variable `data` to `orders` everywhere in this code. "
                                    f"Reply with the complete code only.\n\n```python\n{CODE}```"),
    "quote-sentences": ("grounded", "Quote, word for word, every sentence of this paragraph that mentions "
                                    f"a flood or a mill.\n\n{PARAGRAPH}"),
    # SmolLM2-135M answers a chat request to continue it with unrelated text; as raw text it continues.
    "continue-list": ("grounded", (SCHEDULE + "Thursday:",)),
    "story": ("open-ended", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    "explain": ("open-ended", "Why do leaves change colour in autumn? Explain it to a ten-year-old."),
    "ideas": ("open-ended", "Give me some ideas for a rainy weekend at home with two kids."),
}
QUICK = ("rename-variable", "continue-list", "story")
MODEL = "smollm2-135m-instruct"
LOOKUP_TOKENS = 10  # transformers' prompt_lookup_num_tokens (its docs' example value); llmfn's k is 10 too


def prompt_ids(model, message) -> list[int]:
    if isinstance(message, tuple):
        return model.tokenizer.encode(message[0])
    return apply_chat_template(model.tokenizer, model.chat_template, [{"role": "user", "content": message}])


CLOCK = time.perf_counter  # or time.process_time (--clock cpu)


def timed(tokens) -> tuple[list[int], float]:
    """(token ids, decode seconds: the first token to the last)."""
    out, first = [], None
    for t in tokens:
        if first is None:
            first = CLOCK()
        out.append(t)
    return out, CLOCK() - first


def tok_s(n: int, seconds: float) -> float:
    return (n - 1) / seconds if n > 1 and seconds > 0 else 0.0


def verify_costs(model, label: str, context: int = 300, rows=(1, 2, 4, 8, 16)) -> dict[int, float]:
    """What a forward over t positions costs relative to one (the decode step), after `context`
    cached positions: the price of verifying t - 1 drafted tokens."""
    from llmfn.backend import forward_for
    from llmfn.models import family

    cfg, forward = model.cfg, forward_for(model, decode=True)
    with torch.inference_mode():
        cache = family(cfg).init_cache(cfg, 1, context + 32)
        _, cache = forward(model.params, cfg, torch.randint(0, cfg.vocab_size, (1, context)), torch.arange(context)[None], cache)
        seconds = {}
        for t in rows:
            tokens, positions = torch.randint(0, cfg.vocab_size, (1, t)), torch.arange(context, context + t)[None]
            forward(model.params, cfg, tokens, positions, cache)
            best = float("inf")
            for _ in range(3):
                t0 = CLOCK()
                for _ in range(5):
                    forward(model.params, cfg, tokens, positions, cache)
                best = min(best, (CLOCK() - t0) / 5)
            seconds[t] = best
    costs = {t: s / seconds[1] for t, s in seconds.items()}
    print(f"# {label}: a forward over t positions costs, in decode steps ({seconds[1] * 1e3:.1f} ms): "
          + ", ".join(f"t={t} {c:.2f}" for t, c in costs.items()), flush=True)
    return costs


def llmfn_rows(quantize: str | None, prompts: dict, gen: int, rounds: int, costs: dict | None,
               draft: str | None = None) -> list[dict]:
    """llmfn with and without speculation: prompt lookup, or with `draft` ("int4") a draft model,
    the same model loaded with that quantization."""
    model = llmfn.load(MODEL, compile=False, quantize=quantize)
    label = "llmfn " + (quantize or "fp32")
    spec = "ngram"
    if draft:
        spec = {"method": "draft", "draft": llmfn.load(MODEL, compile=False, quantize=draft), "k": 4}
        label += f", {draft} self-draft"
    rows = []
    list(llmfn.generate(model, [1, 2, 3], max_tokens=8, speculative=spec))  # warm-up: kernels built
    if costs is not None:
        costs[label] = verify_costs(model, label)
    for name, (kind, text) in prompts.items():
        ids = prompt_ids(model, text)
        best = {"plain": 0.0, "ngram": 0.0}
        outputs, stats = {}, {}
        for _ in range(rounds):
            for mode in ("plain", "ngram"):
                stats = {}  # the ngram run's is kept (plain comes first)
                toks, secs = timed(llmfn.generate(model, ids, max_tokens=gen, temperature=0.0,
                                                  speculative=None if mode == "plain" else spec, stats=stats))
                outputs[mode] = toks
                best[mode] = max(best[mode], tok_s(len(toks), secs))
        rows.append({
            "runtime": label, "prompt": name, "kind": kind, "prompt_tokens": len(ids), "tokens": len(outputs["plain"]),
            "plain_tok_s": best["plain"], "spec_tok_s": best["ngram"], "speedup": best["ngram"] / best["plain"],
            "drafted": stats["drafted"], "accepted": stats["accepted"], "forwards": stats["forwards"],
            "same": outputs["plain"] == outputs["ngram"],
        })  # fmt: skip
        print(_line(rows[-1]), flush=True)
    del model
    gc.collect()
    return rows


def transformers_rows(prompts: dict, gen: int, rounds: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    gguf = package_path(ALIASES[MODEL])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer_model = llmfn.load(MODEL, compile=False)  # the same prompt ids as llmfn's
    eos = list(eos_ids(tokenizer_model))
    rows = []
    for name, (kind, text) in prompts.items():
        ids = prompt_ids(tokenizer_model, text)

        def run(max_new, lookup, ids=ids):
            x = torch.tensor([ids])
            mask = torch.ones_like(x)
            kw = {"prompt_lookup_num_tokens": lookup} if lookup else {}
            t0 = CLOCK()
            with torch.inference_mode():
                out = model.generate(x, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                     eos_token_id=eos, pad_token_id=eos[0], **kw)  # fmt: skip
            return out[0, len(ids) :].tolist(), CLOCK() - t0

        prefill = min(run(1, None)[1] for _ in range(2))  # the first token's share, taken off each total
        best = {"plain": 0.0, "lookup": 0.0}
        n = 0
        for _ in range(rounds):
            for mode in ("plain", "lookup"):
                toks, secs = run(gen, LOOKUP_TOKENS if mode == "lookup" else None)
                n = len(toks)
                best[mode] = max(best[mode], tok_s(n, secs - prefill))
        rows.append({"runtime": "transformers fp32", "prompt": name, "kind": kind, "prompt_tokens": len(ids),
                     "tokens": n, "plain_tok_s": best["plain"], "spec_tok_s": best["lookup"],
                     "speedup": best["lookup"] / best["plain"]})  # fmt: skip
        print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    accept = f"{r['accepted'] / r['drafted']:.0%}" if r.get("drafted") else "-"
    per_forward = f"{(r['tokens'] - 1) / r['forwards']:.2f}" if r.get("forwards") else "-"
    same = {True: "yes", False: "NO", None: "-"}[r.get("same")]
    return (f"| {r['runtime']} | {r['prompt']} | {r['kind']} | {r['tokens']} | {r['plain_tok_s']:.1f} | "
            f"{r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | {accept} | {per_forward} | {same} |")  # fmt: skip


HEADER = ("| runtime | prompt | kind | tokens | plain tok/s | speculative tok/s | speedup | accepted | tokens/forward "
          "| same output |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def summary(rows: list[dict]) -> list[str]:
    """Geometric-mean speedup per runtime and prompt kind."""
    out = []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        for kind in ("grounded", "open-ended"):
            sp = [r["speedup"] for r in rows if r["runtime"] == runtime and r["kind"] == kind]
            if sp:
                gm = torch.tensor(sp).log().mean().exp().item()
                out.append(f"| {runtime} | {kind} | {gm:.2f}x | {min(sp):.2f}x | {max(sp):.2f}x |")
    return ["| runtime | kind | geomean speedup | min | max |", "|---|---|---|---|---|", *out]


def run(gen: int = 192, rounds: int = 2, quick: bool = False, peers: bool = True, draft: bool = False) -> dict:
    """Measure everything; returns {"rows": [...], "summary": [...], "meta": {...}}."""
    prompts = {k: v for k, v in PROMPTS.items() if not quick or k in QUICK}
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, "
          f"clock {CLOCK.__name__}, {gen} tokens at most, greedy, best of {rounds}, load average {os.getloadavg()[0]:.1f}")
    print(HEADER, flush=True)
    costs: dict = {}
    rows = llmfn_rows(None, prompts, gen, rounds, costs) + llmfn_rows("int4", prompts, gen, rounds, costs)
    if draft:
        rows += llmfn_rows(None, prompts, gen, rounds, None, draft="int4")
    if peers:
        try:
            rows += transformers_rows(prompts, gen, rounds)
        except ImportError as e:
            print(f"transformers is not installed ({e}): make bench-setup", file=sys.stderr)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "clock": CLOCK.__name__, "gen_tokens": gen, "rounds": rounds,
            "quick": quick}  # fmt: skip
    return {"rows": rows, "summary": summary(rows), "meta": meta, "verify_costs": costs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen-tokens", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="three prompts, one round, 96 tokens")
    ap.add_argument("--no-peers", action="store_true", help="skip transformers")
    ap.add_argument("--draft", action="store_true", help="also fp32 with its int4 copy as the draft model")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: the process's CPU seconds")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    gen, rounds = (96, 1) if args.quick else (args.gen_tokens, args.rounds)
    result = run(gen, rounds, args.quick, not args.no_peers, args.draft)
    print()
    print("\n".join(result["summary"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
