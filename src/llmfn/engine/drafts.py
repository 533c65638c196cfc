"""Speculative decoding inside the engine's decode step (llmfn.speculative has the why and the
drafters): a sequence that drafts k tokens takes k more rows of the step, one per drafted position,
each reading the sequence's own block table. Every row writes its key and value before any row
attends, and the C kernels are row-invariant, so each row's logits are bitwise those of the single
step at its position. Its tokens are then sampled one position at a time with the sequence's own
sampler state (penalties, logit bias, constraint), and a drafted token is kept exactly when it is
the token drawn: the output is the output without speculation. Only prompt lookup (n-gram) drafts
here: a draft model would need a KV cache of its own per sequence."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmfn.engine.paged import PagedKV
from llmfn.engine.requests import Sequence, TokenLogprob
from llmfn.engine.rows import RowSampler
from llmfn.errors import LlmfnError
from llmfn.model import Model
from llmfn.speculative import SpeculativeConfig, drafter_for


class Speculator:
    def __init__(self, config: SpeculativeConfig, model: Model, kv: PagedKV, sampler: RowSampler, max_rows: int):
        if config.method != "ngram":
            raise LlmfnError(f"the engine drafts by prompt lookup (method 'ngram'), not {config.method!r}")
        self.config = config
        self.model = model
        self.kv = kv
        self.sampler = sampler
        self.max_rows = max_rows  # rows a step may have with row-invariant kernels
        self.drafted = self.accepted = 0
        self._state: dict[int, tuple] = {}  # id(sequence) -> (drafter, DraftLength)

    def plan(self, seqs: list[Sequence], rows: int) -> dict[Sequence, list[int]]:
        """Drafts for the sampling sequences, oldest first, within the step's free rows, each one's
        max_tokens and the blocks the pool can give."""
        drafts: dict[Sequence, list[int]] = {}
        budget = self.max_rows - rows
        for s in sorted(seqs, key=lambda s: s.arrival):
            if budget <= 0:
                break
            drafter, length = self._for(s)
            k = length.next(min(budget, s.request.max_tokens - len(s.tokens) - 1))
            proposal = drafter.propose(s.prompt + s.tokens, k) if k else []
            self.kv.grow(s.blocks, s.computed + 1 + len(proposal))
            proposal = proposal[: len(s.blocks) * self.kv.block_size - s.computed - 1]  # what the pool gave
            if proposal:
                drafts[s] = proposal
                budget -= len(proposal)
        return drafts

    def verify(self, s: Sequence, drafts: list[int], logits: torch.Tensor,
               accept: Callable[[Sequence, int, TokenLogprob | None], None]) -> None:
        """Sample s's tokens from the logits of its rows ([1 + k, V]: its own position, then each
        drafted one) in order, keeping drafted tokens while they are the tokens drawn."""
        kept = 0
        for i in range(len(drafts) + 1):
            step = torch.tensor([s.computed], device=logits.device)  # the drawn token's position: s.computed
            # is already past the last key written (the step counted its own row)
            token, logprob = self.sampler.pick(logits[i : i + 1], slice(s.slot, s.slot + 1), step, [s])[0]
            accept(s, token, logprob)
            if s.done or i == len(drafts) or token != drafts[i]:
                break
            kept += 1
            s.computed += 1  # the drafted row's key and value are those of the token just kept
        self.drafted += len(drafts)
        self.accepted += kept
        self._for(s)[1].observe(len(drafts), kept)

    def forget(self, s: Sequence) -> None:
        self._state.pop(id(s), None)

    def _for(self, s: Sequence) -> tuple:
        state = self._state.get(id(s))
        if state is None:
            state = self._state[id(s)] = drafter_for(self.config, self.model, 0, None)
        return state
