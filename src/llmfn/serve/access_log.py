"""One access line per HTTP request: a pure-ASGI middleware around the app (outside auth and CORS,
so refused requests are logged too), writing to the "llmfn.access" logger on stderr.

    [access] 127.0.0.1 "POST /v1/chat/completions" 200 model=smollm2-135m-instruct prompt_tokens=31 completion_tokens=24 0.532s
    {"time": "2026-12-07T02:00:00.123Z", "client": "127.0.0.1", "method": "POST", "path": "/v1/chat/completions",
     "status": 200, "model": "smollm2-135m-instruct", "prompt_tokens": 31, "completion_tokens": 24, "duration_s": 0.532}

The handlers know the model and the token counts, the middleware the status and the time: each
request gets an `AccessRecord` in a context variable, which the generations' `metrics.Tracking` and
the embeddings handler fill (`note`). A request whose response never started (the client left) is
logged with status 499, as nginx does and as the metrics count it."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("llmfn.access")
Format = Literal["text", "json"]
GONE = 499  # nginx's "client closed request": no response was started


@dataclass
class AccessRecord:
    """What the handlers learnt about one request: its model and the generations' last events."""

    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tracks: list = field(default_factory=list)  # metrics.Tracking of each generation (n > 1: several)

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) summed over the generations, as the usage field sums them."""
        lasts = [t.last for t in self.tracks if t.last is not None]
        return (self.prompt_tokens + sum(ev.prompt_tokens for ev in lasts),
                self.completion_tokens + sum(ev.completion_tokens for ev in lasts))  # fmt: skip


_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar("llmfn_access", default=None)


def track(tracking) -> None:
    """Count a generation (a metrics.Tracking, read when the request ends) in this request's line."""
    record = _current.get()
    if record is not None:
        record.model = record.model or tracking.model
        record.tracks.append(tracking)


def note(model: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    """Count tokens that no generation tracks (embeddings) in this request's line."""
    record = _current.get()
    if record is not None:
        record.model = record.model or model
        record.prompt_tokens += prompt_tokens
        record.completion_tokens += completion_tokens


def setup(fmt: Format) -> None:
    """The access logger writes bare lines to stderr (JSON lines stay parseable), apart from the
    server log's "[INFO] llmfn:" lines; a handler configured by the embedding program is kept."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s" if fmt == "json" else "[access] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def format_line(fmt: Format, *, client: str, method: str, path: str, status: int, model: str | None,
                prompt_tokens: int | None, completion_tokens: int | None, duration_s: float,
                when: float | None = None) -> str:  # fmt: skip
    """One request as a text or JSON line (token counts None: the request generated nothing)."""
    if fmt == "json":
        when = time.time() if when is None else when
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"
        return json.dumps({"time": stamp, "client": client, "method": method, "path": path, "status": status,
                           "model": model, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "duration_s": round(duration_s, 4)})  # fmt: skip
    parts = [client, f'"{method} {path}"', str(status)]
    if model is not None:
        parts.append(f"model={model}")
    if prompt_tokens is not None:
        parts += [f"prompt_tokens={prompt_tokens}", f"completion_tokens={completion_tokens}"]
    parts.append(f"{duration_s:.3f}s")
    return " ".join(parts)


class AccessLog:
    """ASGI middleware: one line per HTTP request once its response has ended."""

    def __init__(self, app, fmt: Format = "text"):
        self.inner, self.fmt = app, fmt
        setup(fmt)

    def __getattr__(self, name: str):
        """The wrapped app's attributes read through: `create_app(config).pool` (or `.app.pool`
        behind auth) finds what it found before the access log wrapped the app."""
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        started = time.perf_counter()
        record = AccessRecord()
        token = _current.set(record)  # tasks the app starts copy the context: they see this record
        status = GONE

        async def logged_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, logged_send)
        except Exception:  # (a cancellation, the client or the server going away, stays 499)
            status = 500 if status == GONE else status
            raise
        finally:
            _current.reset(token)
            counted = bool(record.tracks) or record.prompt_tokens > 0
            prompt, completion = record.tokens() if counted else (None, None)
            client = scope.get("client")
            log.info("%s", format_line(self.fmt, client=client[0] if client else "-", method=scope["method"],
                                       path=scope["path"], status=status, model=record.model, prompt_tokens=prompt,
                                       completion_tokens=completion, duration_s=time.perf_counter() - started))  # fmt: skip
