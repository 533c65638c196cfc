"""Speculative decoding that changes nothing but the speed: guess the next tokens cheaply, check all
of them with one forward of the model over k + 1 positions, keep the ones it would have produced.

Exact by construction, for greedy and seeded sampling alike:
- a drafted token is kept exactly when it equals the token the sampler draws at its position, and
  the sampler is a pure function of (seed, position, logits) (llmfn.sampling), so no distribution
  changes and no rejection sampling is needed;
- the logits of a verify pass equal bitwise those of single decode steps. That holds where the
  forward runs llmfn's C decode kernels (fp32 activations on CPU, at most kernels.cpu.MAX_ROWS rows,
  fp32 / int4 / int8 weights): every output element is one dot product summed in an order fixed by
  its column, never by the rows beside it, and a query at position p reads only the cache slots
  <= p, written before any row attends. Elsewhere (torch.compile, bf16, CUDA, oneDNN's prefill GEMM)
  results may depend on the number of rows, so `verify_rows` returns 0 there and generation runs
  plain decode steps: the same output, without the speed-up.
Keys and values written for rejected drafts sit past the accepted text; the next pass overwrites
them before any query can read them (positions are explicit).

Drafters: `NgramDrafter` (prompt lookup: the longest recent n-gram of the text seen before proposes
what followed it) and `ModelDrafter` (a smaller model with the same vocabulary, e.g. the int4 copy of
the same model, runs k cheap steps). `DraftLength` picks k from the recent acceptance rate and the
cost of a verified row, and falls to 0 when drafts keep failing, so text that is not a copy of its
input runs at plain decode speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmfn.backend import forward_for, row_invariant_rows
from llmfn.errors import RequestError
from llmfn.kernels import cpu
from llmfn.model import Model
from llmfn.models import family, llama

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to draft. method: "ngram" (prompt lookup) or "draft" (the `draft` model proposes).
    k: most tokens drafted per step. min_ngram / max_ngram: the n-gram sizes matched, longest first
    (2..5 drafted the most kept tokens per forward over benchmarks/speculative.py's replies; a 1-gram
    match is mostly wrong in free text).
    row_cost: what one more verified row costs, in decode steps (the forward over 1 + k rows costs
    about 1 + row_cost * k steps). None: 0.15 for fp32 weights, 0.33 for int4 / int8 ones, whose
    kernels spend more per row (SmolLM2-135M, benchmarks/speculative.py: 0.13-0.21 and 0.27-0.44).
    draft_cost: what one drafted token costs, in target decode steps (None: the draft's share of the
    target's weight bytes, since a decode step streams its weights once)."""

    method: str = "ngram"
    k: int = 10
    min_ngram: int = 2
    max_ngram: int = 5
    row_cost: float | None = None
    draft: Model | None = field(default=None, compare=False)
    draft_cost: float | None = None


def as_config(spec, model: Model) -> SpeculativeConfig | None:
    """The SpeculativeConfig a `speculative=` argument names: None, a method name ("ngram"), a dict of
    SpeculativeConfig's fields or a SpeculativeConfig; RequestError (param "speculative") otherwise."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, str):
        spec = {"method": spec}
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(SpeculativeConfig.__dataclass_fields__))
        if unknown:
            raise RequestError(f"speculative: unknown field {unknown[0]!r}", param="speculative")
        spec = SpeculativeConfig(**spec)
    if not isinstance(spec, SpeculativeConfig):
        raise RequestError("speculative must be None, a method name, a dict or a SpeculativeConfig",
                           param="speculative")  # fmt: skip
    _check(spec, model)
    return spec


def _check(spec: SpeculativeConfig, model: Model) -> None:
    def bad(message: str):
        raise RequestError(f"speculative: {message}", param="speculative")

    if spec.method not in METHODS:
        bad(f"method must be one of {', '.join(METHODS)}, got {spec.method!r}")
    if not isinstance(spec.k, int) or isinstance(spec.k, bool) or not 1 <= spec.k <= cpu.MAX_ROWS - 1:
        bad(f"k must be an integer in [1, {cpu.MAX_ROWS - 1}], got {spec.k!r}")
    if not (isinstance(spec.min_ngram, int) and isinstance(spec.max_ngram, int) and 1 <= spec.min_ngram <= spec.max_ngram):
        bad(f"need 1 <= min_ngram <= max_ngram, got {spec.min_ngram!r} and {spec.max_ngram!r}")
    if spec.row_cost is not None and (not isinstance(spec.row_cost, int | float) or not 0 <= spec.row_cost <= 10):
        bad(f"row_cost must be a number in [0, 10], got {spec.row_cost!r}")
    if spec.method == "draft":
        draft = spec.draft
        if not isinstance(draft, Model) or draft.kind != "causal-lm":
            bad('method "draft" needs draft=<a causal language Model>')
        if draft.cfg.vocab_size != model.cfg.vocab_size:
            bad(f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the model's "
                f"({model.cfg.vocab_size})")  # fmt: skip


def verify_rows(model: Model) -> int:
    """Most rows a verify pass may take with logits bitwise those of single decode steps: the C decode
    kernels' row limit where every op of a step runs on them (backend.row_invariant_rows), else 0."""
    return row_invariant_rows(model) if model.kind == "causal-lm" else 0


def same_rope(cfg: llama.LlamaConfig, first: int, last: int) -> bool:
    """Whether positions first..last get the rope of their own single steps in one pass. Qwen-1's
    dynamic NTK takes its rotary base from the pass's largest position (models/llama.py), so a pass
    must not cross a change of that base; its base grows with the position, so the ends decide."""
    if not cfg.dynamic_ntk_length:
        return True
    freqs = llama.dynamic_ntk_inv_freq(cfg, torch.tensor([[first], [last]]))
    return torch.equal(freqs[0], freqs[1])


def expected_gain(rate: float, k: int) -> float:
    """Tokens a verify pass yields when each drafted token is kept with probability `rate` given the
    ones before it were: 1 + rate + rate^2 + ... + rate^k."""
    return sum(rate**i for i in range(k + 1))


@dataclass
class DraftLength:
    """Picks the number of tokens to draft from the recent per-token acceptance rate (a moving average,
    `weight` per observation): the k in [0, k_max] that maximises tokens per unit of cost,
    expected_gain(rate, k) / (1 + cost * k). At k = 0 (drafts kept failing) it still drafts one token
    after `probe_every` steps, so a later stretch of copied text is noticed; each failed probe doubles
    that wait (up to 8x), so text that copies nothing pays almost nothing for the probes."""

    k_max: int
    cost: float
    rate: float = 0.7
    weight: float = 0.15
    probe_every: int = 8
    idle: int = 0
    backoff: int = 1

    def observe(self, drafted: int, accepted: int) -> None:
        """A verify pass kept `accepted` of `drafted` tokens: the first rejection counts as a failure,
        the drafts after it were never tested."""
        for _ in range(accepted):
            self.rate += self.weight * (1.0 - self.rate)
        if accepted < drafted:
            self.rate -= self.weight * self.rate
        if drafted:
            self.backoff = 1 if accepted else min(8, self.backoff * 2)

    def next(self, limit: int) -> int:
        """How many tokens to draft now, at most `limit`."""
        limit = min(limit, self.k_max)
        if limit <= 0:
            return 0
        gains = [expected_gain(self.rate, k) / (1.0 + self.cost * k) for k in range(limit + 1)]
        k = max(range(limit + 1), key=gains.__getitem__)
        if k == 0:
            self.idle += 1
            if self.idle >= self.probe_every * self.backoff:
                self.idle = 0
                return 1
        return k


class NgramDrafter:
    """Prompt lookup: the last n tokens (n from max_n down to min_n) are looked up in the text before
    them, and the tokens that followed their most recent occurrence are proposed. An index of every
    n-gram's latest position grows with the text, so a lookup costs O(max_n), not O(length)."""

    def __init__(self, min_n: int, max_n: int):
        self.sizes = range(max_n, min_n - 1, -1)
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> the position right after its latest occurrence
        self.indexed = 0  # tokens[:indexed] have their n-grams ending before position indexed - 1 indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that may follow `tokens` (the prompt and the text generated so far)."""
        end = len(tokens)
        for i in range(max(self.indexed, 1), end):  # n-grams that end at i - 1 and have a follower at i
            for n in self.sizes:
                if n <= i:
                    self.index[tuple(tokens[i - n : i])] = i
        self.indexed = max(self.indexed, end)
        for n in self.sizes:
            if n <= end:
                at = self.index.get(tuple(tokens[end - n :]))
                if at is not None:
                    return tokens[at : min(at + k, end)]
        return []


Pick = Callable[[torch.Tensor, int], int]  # (fp32 logits [V], position) -> the token the sampler draws


class ModelDrafter:
    """A smaller model with the same vocabulary proposes k tokens, one cheap decode step each, drawn
    with the target's own sampler (same seed, same position), so a draft model whose logits are close
    to the target's proposes the very token the target then draws, sampled or greedy alike. The draft
    keeps its own KV cache; what it cached for tokens that were then rejected is recomputed."""

    def __init__(self, draft: Model, length: int, pick: Pick):
        self.model = draft
        self.pick = pick
        cfg = draft.cfg
        self.cache = family(cfg).init_cache(cfg, 1, length, draft.params["norm"].dtype, draft.params["norm"].device)
        self.forward = forward_for(draft)
        self.cached: list[int] = []  # the tokens whose keys and values the draft's cache holds, in order

    def propose(self, tokens: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        valid = 0
        limit = min(len(self.cached), len(tokens) - 1)  # the last token is fed again: its logits are needed
        while valid < limit and self.cached[valid] == tokens[valid]:
            valid += 1
        feed, drafts = tokens[valid:], []
        device = self.model.params["norm"].device
        with torch.inference_mode():
            while True:
                position = valid + len(feed)  # the position of the token drafted next
                positions = torch.arange(valid, position, device=device)[None]
                out, self.cache = self.forward(self.model.params, self.model.cfg, torch.tensor([feed], device=device),
                                               positions, self.cache,
                                               logit_index=torch.tensor([len(feed) - 1], device=device))  # fmt: skip
                valid = position
                drafts.append(self.pick(out[0, -1], position))
                if len(drafts) == k:
                    break
                feed = drafts[-1:]
        self.cached = tokens + drafts[:-1]
        return drafts


def weight_bytes(tree) -> int:
    """Bytes of a params tree's tensors (quantized leaves count their packed storage)."""
    if isinstance(tree, dict):
        return sum(weight_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(weight_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if hasattr(tree, "__dataclass_fields__"):
        return sum(weight_bytes(getattr(tree, f)) for f in tree.__dataclass_fields__)
    return 0


def row_cost(spec: SpeculativeConfig, model: Model) -> float:
    """The config's row_cost, or the default for the model's weights (see SpeculativeConfig)."""
    if spec.row_cost is not None:
        return spec.row_cost
    layers = model.params.get("layers") or [{}]
    return 0.15 if isinstance(layers[0].get("wqkv"), torch.Tensor) else 0.33


def drafter_for(spec: SpeculativeConfig, model: Model, length: int, pick: Pick):
    """(drafter, DraftLength) for a config; `length`: the KV cache length a draft model needs."""
    cost = row_cost(spec, model)
    if spec.method == "ngram":
        return NgramDrafter(spec.min_ngram, spec.max_ngram), DraftLength(spec.k, cost)
    draft_cost = spec.draft_cost
    if draft_cost is None:
        draft_cost = weight_bytes(spec.draft.params) / max(1, weight_bytes(model.params))
    return ModelDrafter(spec.draft, length, pick), DraftLength(spec.k, cost + draft_cost)
