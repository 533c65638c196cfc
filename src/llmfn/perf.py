"""The decoder perf report: prefill (time to the first token) and decode timed apart.

    report = measure(model, prompt_ids, max_tokens=128)
    print(format_report(report))

Used by `llmfn bench`, `llmfn chat` (/perf) and benchmarks/decode.py. Each generated token id
is read back to the host (`int(token)`), so on CUDA the timings include the device work."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from llmfn.generate import generate
from llmfn.model import Model


@dataclass(frozen=True)
class PerfReport:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float  # from the call to the first generated token (prompt forward + first sample)
    decode_s: float  # from the first generated token to the last
    decode_tok_s: float  # tokens 2..n over decode_s
    avg_tok_s: float  # all generated tokens over prefill_s + decode_s

    @classmethod
    def of(cls, prompt_tokens: int, generated_tokens: int, prefill_s: float, decode_s: float) -> PerfReport:
        decode_tok_s = (generated_tokens - 1) / decode_s if generated_tokens > 1 and decode_s > 0 else 0.0
        total = prefill_s + decode_s
        avg_tok_s = generated_tokens / total if total > 0 else 0.0
        return cls(prompt_tokens, generated_tokens, prefill_s, decode_s, decode_tok_s, avg_tok_s)

    def as_dict(self) -> dict:
        return asdict(self)


class TokenClock:
    """Wraps an iterator of token ids and times it: the first `next()` is the prefill.

    Iterate it in place of the tokens; afterwards (or at any point) `report()` gives the figures."""

    def __init__(self, tokens: Iterable[int], prompt_tokens: int):
        self._tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self._start = self._first = self._last = None

    def __iter__(self) -> Iterator[int]:
        self._start = time.perf_counter()
        for token in self._tokens:
            now = time.perf_counter()
            if self._first is None:
                self._first = now
            self._last = now
            self.generated += 1
            yield token

    def report(self) -> PerfReport:
        if self._first is None:
            return PerfReport.of(self.prompt_tokens, 0, 0.0, 0.0)
        return PerfReport.of(self.prompt_tokens, self.generated, self._first - self._start, self._last - self._first)


def measure(model: Model, prompt_ids: list[int], max_tokens: int, **sampling) -> PerfReport:
    """Generate from prompt_ids and time prefill and decode separately.

    EOS is ignored unless `stop_token_ids` is given, so exactly max_tokens tokens are generated
    and runs are comparable; decoding is greedy unless a temperature is given (the model's default
    sampling would time the sampler too); other keyword arguments are generate()'s."""
    sampling.setdefault("stop_token_ids", [])
    sampling.setdefault("temperature", 0.0)
    clock = TokenClock(generate(model, prompt_ids, max_tokens=max_tokens, **sampling), len(prompt_ids))
    for _ in clock:
        pass
    return clock.report()


def format_report(report: PerfReport) -> str:
    """One line: prompt and generated lengths, prefill s, decode s, decode and average tok/s."""
    r = report
    return (
        f"prompt {r.prompt_tokens} tok | generated {r.generated_tokens} tok | prefill {r.prefill_s:.3f} s | "
        f"decode {r.decode_s:.3f} s | decode {_rate(r.decode_tok_s)} tok/s | avg {_rate(r.avg_tok_s)} tok/s"
    )


def _rate(x: float) -> str:
    return f"{x:.1f}" if x >= 10 or x == 0 else f"{x:.3g}"
