"""What int8 activations cost in accuracy: SmolLM2-135M-Instruct's Q4_1 GGUF loaded with
quantize="int4" (int4 layers, Q8_0 embedding and lm_head), decoded with int8 activations
(LLMFN_QUANT_ACTIVATIONS=int8) and with fp32 ones (=fp32, the exact product with the dequantized
weights), each against the same model with every weight dequantized to fp32 (the reference):

- max |logit difference| over every decode step of a teacher-forced text;
- greedy agreement: the reference's greedy continuation of a prompt, and at each of its steps
  whether the quantized model's argmax (given the same prefix) is the same token; plus the first
  step where free-running greedy decoding of the two differs;
- perplexity of the text under each model (decode steps, one token at a time: the rows that take
  the int8-activation kernels, as generation does).

    python benchmarks/quant_accuracy.py [--gen-tokens 300]
"""

from __future__ import annotations

import argparse
import math
import os

# isort: off
import llmfn  # before torch: llmfn's OpenMP defaults
import torch

# isort: on
from llmfn.backend import fused_forward
from llmfn.loading.quantize import dequantize_params
from llmfn.models import llama

ALIAS = "smollm2-135m-instruct"
TEXT = (
    "The lighthouse stood at the edge of the harbour for more than a century. Its keepers kept a log of "
    "every ship that passed, the weather of each night and the oil the lamp burned. When the lamp was "
    "electrified in the nineteen thirties, the last keeper stayed on for another decade, repainting the "
    "tower each spring and answering letters from children who wanted to know what the sea looked like "
    "in a storm. He wrote that the waves were grey and white, that the wind sang in the railings, and "
    "that the light turned all night whether anyone watched it or not. Today the tower is a small museum. "
    "Visitors climb the spiral stairs, read the keepers' logs behind glass and look out over the water, "
    "where the ferries now follow a route drawn by satellites rather than by the beam of a lamp. "
)
PROMPT = "Write a short story about a robot who learns to paint."


def step_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] from one decode step per token (the KV-cached path generation takes)."""
    cache = llama.init_cache(model.cfg, 1, len(ids) + 1)
    out = []
    for i, t in enumerate(ids):
        logits, cache = fused_forward(model.params, model.cfg, torch.tensor([[t]]), torch.tensor([[i]]), cache)
        out.append(logits[0, -1])
    return torch.stack(out)


def greedy(model, ids: list[int], n: int) -> list[int]:
    return list(llmfn.generate(model, ids, max_tokens=n, temperature=0.0, stop_token_ids=[]))


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]))
    return math.exp(nll.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gen-tokens", type=int, default=300)
    args = parser.parse_args()
    model = llmfn.load(ALIAS, quantize="int4")
    dense = llmfn.Model(**{**model.__dict__, "params": dequantize_params(model.params)})
    text = model.tokenizer.encode(TEXT)
    chat = model.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        ref_text = step_logits(dense, text)
        ref_gen = greedy(dense, chat, args.gen_tokens)
        forced = chat + ref_gen
        ref_forced = step_logits(dense, forced)[len(chat) - 1 : -1].argmax(-1)
        print(f"# {ALIAS} int4 (Q4_1 layers, Q8_0 embedding / lm_head) vs its dequantized fp32 model; "
              f"text {len(text)} tokens, greedy {len(ref_gen)} tokens, ISA {os.environ.get('LLMFN_CPU_ISA') or 'best'}")
        print("| activations | max abs logit diff | mean abs logit diff | teacher-forced greedy agreement | "
              "first free-running difference | perplexity (fp32 reference) |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode in ("fp32", "int8"):
            os.environ["LLMFN_QUANT_ACTIVATIONS"] = mode
            got = step_logits(model, text)
            diff = (got - ref_text).abs()
            agree = (step_logits(model, forced)[len(chat) - 1 : -1].argmax(-1) == ref_forced).float().mean().item()
            gen = greedy(model, chat, args.gen_tokens)
            first = next((i for i, (a, b) in enumerate(zip(gen, ref_gen, strict=False)) if a != b), None)
            print(f"| {mode} | {diff.max():.4f} | {diff.mean():.5f} | {agree * 100:.1f}% of {len(ref_gen)} | "
                  f"{'none' if first is None else f'step {first}'} | {perplexity(got, text):.3f} "
                  f"({perplexity(ref_text, text):.3f}) |", flush=True)


if __name__ == "__main__":
    main()
