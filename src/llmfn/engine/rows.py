"""Per-row sampling state of the engine's decode batch: each row's sampling settings as [rows]
tensors (llmfn.sampling meanings) and the token counts its penalties read, set when a sequence takes
the row. `pick` samples many rows in one call, so a step costs one host sync (two with logprobs).
Logit biases and constraint masks touch only the rows that have them, and cost nothing in a step
where no row does."""

from __future__ import annotations

import torch

from llmfn.constraints import bitmask_words
from llmfn.engine.requests import Sequence, TokenLogprob
from llmfn.sampling import apply_logit_bias, apply_penalties, apply_token_bitmask, greedy, sample


class RowSampler:
    def __init__(self, rows: int, vocab: int, device: torch.device):
        zeros = lambda dt: torch.zeros(rows, dtype=dt, device=device)  # noqa: E731
        ones = lambda: torch.ones(rows, dtype=torch.float32, device=device)  # noqa: E731
        self.device = device
        self.knobs = {"temperature": zeros(torch.float32), "top_k": zeros(torch.int64), "top_p": ones(),
                      "min_p": zeros(torch.float32), "seed": zeros(torch.int64)}  # fmt: skip
        self.penalty = {"repetition_penalty": ones(), "presence_penalty": zeros(torch.float32),
                        "frequency_penalty": zeros(torch.float32)}  # fmt: skip
        self.counts = torch.zeros(rows, vocab, dtype=torch.int64, device=device)  # generated occurrences
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)  # in prompt or output
        # Constraint masks (CPU, llmfn.constraints layout); a row without a constraint allows every id.
        self.bitmask = torch.full((rows, bitmask_words(vocab)), -1, dtype=torch.int32)

    def assign(self, j: int, s: Sequence) -> None:
        """Row j now samples for sequence s (its settings, its prompt seen, its generated tokens counted:
        none, or those it had when it was preempted)."""
        sp = s.request.sampling
        temperature = 0.0 if sp.greedy else sp.temperature  # top_k=1 too: argmax, as generate does
        for name, value in (("temperature", temperature), ("top_k", sp.top_k), ("top_p", sp.top_p),
                            ("min_p", sp.min_p), ("seed", s.seed)):  # fmt: skip
            self.knobs[name][j] = value
        for name, t in self.penalty.items():
            t[j] = getattr(sp, name)
        self.counts[j] = 0
        self.seen[j] = False
        self.bitmask[j] = -1  # a constrained sequence rewrites it before every pick
        self.seen[j, torch.tensor(s.prompt, device=self.device)] = True
        if s.tokens:
            out = torch.tensor(s.tokens, device=self.device)
            self.counts[j].index_put_((out,), torch.ones_like(out), accumulate=True)
            self.seen[j, out] = True

    def pick(self, logits: torch.Tensor, rows: slice, step: torch.Tensor, seqs: list[Sequence]) -> list:
        """Sample the next token of `rows` (logits [r, V] fp32; step [r]: the sampled token's position).
        Returns, per row, (token id, TokenLogprob or None)."""
        raw = logits
        start = rows.start or 0
        penalized = any(s.request.sampling.penalized for s in seqs)
        if penalized:
            pen = [t[rows] for t in self.penalty.values()]
            logits = apply_penalties(logits, self.counts[rows], self.seen[rows], *pen)
        biased = [s for s in seqs if s.bias is not None]
        if biased:
            at = torch.cat([torch.full_like(s.bias[0], s.slot - start) for s in biased])
            logits = apply_logit_bias(logits, at, torch.cat([s.bias[0] for s in biased]),
                                      torch.cat([s.bias[1] for s in biased]))  # fmt: skip
        guided = [s for s in seqs if s.guide is not None]
        if guided:  # each row's mask depends on its own sequence alone
            for s in guided:
                s.guide.allowed(self.bitmask[s.slot])
            if 2 * len(guided) >= logits.shape[0]:  # the whole slice (other rows' masks allow all)
                logits = apply_token_bitmask(logits, self.bitmask[rows])
            else:  # only the constrained rows
                slots = [s.slot for s in guided]
                at = torch.tensor(slots, device=logits.device) - start
                logits = logits.index_copy(0, at, apply_token_bitmask(logits[at], self.bitmask[slots]))
        if all(s.request.sampling.greedy for s in seqs):
            ids = greedy(logits)
        else:
            ids = sample(logits, step=step, **{k: t[rows] for k, t in self.knobs.items()})
        if penalized:  # only penalized rows read the counts
            live = torch.tensor([s.slot for s in seqs], device=ids.device) - (rows.start or 0)  # [n]
            self.counts[rows][live, ids[live]] += 1
            self.seen[rows][live, ids[live]] = True
        n_top = max((s.request.logprobs for s in seqs if s.request.logprobs is not None), default=None)
        if n_top is None:
            return [(i, None) for i in ids.tolist()]
        lsm = torch.log_softmax(raw, dim=-1)  # [r, V]
        chosen = lsm.gather(1, ids[:, None])[:, 0]
        top_lp, top_id = lsm.topk(n_top, dim=-1)
        rows_out = zip(ids.tolist(), chosen.tolist(), top_id.tolist(), top_lp.tolist(), strict=True)
        return [(i, TokenLogprob(i, lp, tuple(zip(tid, tlp, strict=True)))) for i, lp, tid, tlp in rows_out]
