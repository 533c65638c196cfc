"""The engine's per-token logprobs in OpenAI's two shapes: chat's list of tokens (with their bytes)
and legacy completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""

from __future__ import annotations

from llmfn.serve import schemas as s
from llmfn.serve.models import Served


def token_logprobs(served: Served, ev) -> list[s.TokenLogprob]:
    """OpenAI chat logprobs for the tokens of one event, from the engine's per-token data."""
    out = []
    for entry in getattr(ev, "logprobs", None) or []:
        token_id, logprob, tops = logprob_entry(entry)
        top = [s.TopLogprob(*token_text(served, t), lp) for t, lp in tops]
        text, raw = token_text(served, token_id)
        out.append(s.TokenLogprob(text, raw, logprob, top))
    return out


def token_text(served: Served, token_id: int) -> tuple[str, list[int]]:
    """(text, UTF-8 bytes) of one token; the bytes are exact even when the text is a partial character."""
    tok = served.model.tokenizer
    text = tok.decode([token_id])
    try:
        raw = bytes(tok.token_bytes(token_id))
    except Exception:
        raw = text.encode()
    return text, list(raw)


def logprob_entry(entry) -> tuple[int, float, list[tuple[int, float]]]:
    """(token id, logprob, [(id, logprob), ...]) from the engine's entry (tuple, dict or object)."""
    if isinstance(entry, dict):
        return (
            entry["token_id"],
            float(entry["logprob"]),
            list(entry.get("top", entry.get("top_logprobs", []))),
        )
    if isinstance(entry, tuple):
        token_id, logprob, *rest = entry
        tops = rest[0] if rest else []
        return token_id, float(logprob), list(tops.items() if isinstance(tops, dict) else tops)
    tops = getattr(entry, "top", None) or getattr(entry, "top_logprobs", None) or []
    return entry.token_id, float(entry.logprob), list(tops.items() if isinstance(tops, dict) else tops)


class CompletionLogprobs:
    """The legacy completions logprobs object, accumulated over events."""

    def __init__(self, served: Served):
        self.tok = served.model.tokenizer
        self.tokens, self.token_logprobs, self.top, self.offsets = [], [], [], []

    def add(self, ev, offset: int) -> None:
        """The tokens of `ev`, whose text starts at character `offset` of the choice's text."""
        for entry in getattr(ev, "logprobs", None) or []:
            token_id, logprob, tops = logprob_entry(entry)
            text = self.tok.decode([token_id])
            self.tokens.append(text)
            self.token_logprobs.append(logprob)
            self.top.append({self.tok.decode([t]): lp for t, lp in tops})
            self.offsets.append(offset)
            offset += len(text)

    def result(self) -> s.CompletionLogprobs:
        return s.CompletionLogprobs(self.tokens, self.token_logprobs, self.top, self.offsets)
