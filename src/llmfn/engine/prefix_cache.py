"""Prefix caching: which prompt tokens' KV each cache row still holds, and where a new prompt goes.

A row remembers the prompt chunks whose KV it holds (whole prefill chunks only; they stay valid after
the sequence finishes, until the row is reused or overwritten). A new prompt that starts with the same
chunks skips their prefill: it takes the free row holding the longest match, or the engine copies the
match from another row. A chunk's KV depends only on the tokens up to its end, computed in the same
shape, so reused KV is bitwise what prefill would have written and outputs stay identical."""

from __future__ import annotations


class PrefixCache:
    def __init__(self, rows: int, chunk: int, enabled: bool = True):
        self.chunk = chunk
        self.enabled = enabled
        self.held: list[list[int]] = [[] for _ in range(rows)]  # prompt tokens (whole chunks) with valid KV
        self.freed_at = [0] * rows  # step at which each row was last freed

    def place(self, prompt: list[int], free: list[int], rows: int) -> tuple[int, int | None, int]:
        """(target row among `free`, row to copy the reused KV from or None, reused prompt tokens),
        searching rows [0, rows). Only whole chunks are reused, and never the chunk holding the last
        prompt token (its logits are needed). Without a match: the least recently freed row."""
        if not self.enabled:
            return free[0], None, 0
        C = self.chunk
        limit = (len(prompt) - 1) // C * C

        def match(j: int) -> int:
            held, m = self.held[j], 0
            while m + C <= min(limit, len(held)) and held[m : m + C] == prompt[m : m + C]:
                m += C
            return m

        matches = [match(j) for j in range(rows)]
        target = max(free, key=lambda j: (matches[j], -self.freed_at[j]))
        source = max(range(rows), key=lambda j: matches[j])
        if matches[source] > matches[target]:
            self.held[target] = prompt[: matches[source]]
            return target, source, matches[source]
        self.held[target] = prompt[: matches[target]]
        return target, None, matches[target]

    def prefilled(self, row: int, prompt: list[int], end: int) -> None:
        """Prefill wrote positions [0, end) of `prompt` into `row`; a whole chunk is now reusable."""
        if end % self.chunk == 0:
            self.held[row] = prompt[:end]

    def overwritten_from(self, row: int, position: int) -> None:
        """Positions from `position` on were overwritten: the chunks that reach them are gone."""
        if len(self.held[row]) > position:
            del self.held[row][position // self.chunk * self.chunk :]

    def forget(self, row: int) -> None:
        self.held[row] = []
