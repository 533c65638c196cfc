"""Prometheus text exposition (format 0.0.4) for the server: counters, histograms and gauges, each
labelled, kept in plain dicts. One process's view: with several Granian workers, each answers for
itself. `Tracking` records one generation's share."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

from llmfn.serve import access_log

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help, self.values, self.lock = name, help, {}, threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.values: dict[Labels, list] = {}  # labels -> [bucket counts..., sum, count]
        self.lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            row = self.values.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                row[i] += 1
            row[-2] += value
            row[-1] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, row in sorted(self.values.items()):
            total = 0
            for bound, n in zip(self.buckets, row, strict=False):
                total += n
                le = 'le="' + _num(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(key, le)} {total}")
            inf = 'le="+Inf"'
            lines.append(f"{self.name}_bucket{_labels(key, inf)} {row[-1]}")
            lines.append(f"{self.name}_sum{_labels(key)} {_num(row[-2])}")
            lines.append(f"{self.name}_count{_labels(key)} {row[-1]}")
        return lines


class Gauge:
    """Read at scrape time from a callback returning {labels tuple: value}."""

    def __init__(self, name: str, help: str, read: Callable[[], dict[Labels, float]]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        lines += [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.read().items())]
        return lines


class Metrics:
    """The server's metrics; gauges are added by the app once it knows its engines."""

    def __init__(self) -> None:
        self.requests = Counter("llmfn_requests_total", "HTTP requests by route and status code.")
        self.prompt_tokens = Counter("llmfn_prompt_tokens_total", "Prompt tokens processed, by model.")
        self.generation_tokens = Counter("llmfn_generation_tokens_total", "Tokens generated, by model.")
        self.finished = Counter("llmfn_generations_total", "Finished generations by model and finish reason.")
        self.latency = Histogram(
            "llmfn_request_duration_seconds", "Time from request to the last byte, by route."
        )
        self.ttft = Histogram(
            "llmfn_time_to_first_token_seconds", "Time from request to the first generated token."
        )
        self.tpot = Histogram("llmfn_time_per_output_token_seconds", "Mean time between generated tokens, per request.",
                              (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))  # fmt: skip
        self.gauges: list[Gauge] = []

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.prompt_tokens, self.generation_tokens, self.finished, self.latency,
                       self.ttft, self.tpot, *self.gauges):  # fmt: skip
            lines += metric.render()
        return "\n".join(lines) + "\n"


class Tracking:
    """Per-generation metrics: time to first token, time per output token, token counts."""

    def __init__(self, metrics: Metrics, model: str, t0: float):
        self.metrics, self.model, self.t0 = metrics, model, t0
        self.first: float | None = None
        self.last = None
        self.closed = False
        access_log.track(self)  # the request's access line reads the token counts at its end

    def event(self, ev) -> None:
        self.last = ev
        if self.first is None and ev.token_ids:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.t0, model=self.model)

    def close(self) -> None:
        """Record the outcome once; a generation that ended without a finish_reason was abandoned
        (client gone, or an error) and counts as "cancelled"."""
        if self.closed:
            return
        self.closed = True
        m, last = self.metrics, self.last
        reason = "cancelled" if last is None or last.finish_reason is None else last.finish_reason
        m.finished.inc(model=self.model, reason=reason)
        if last is None:
            return
        m.prompt_tokens.inc(last.prompt_tokens, model=self.model)
        m.generation_tokens.inc(last.completion_tokens, model=self.model)
        if reason != "cancelled" and self.first is not None and last.completion_tokens > 1:
            m.tpot.observe((time.perf_counter() - self.first) / (last.completion_tokens - 1), model=self.model)
