"""The bridge from the engine's loop thread to an asyncio consumer: one RequestStream per request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from llmfn.engine.requests import GenerationEvent, Sequence


class RequestStream:
    """The events of one submitted request: an async iterator (also awaitable, returning itself, so
    `await engine.submit(r)` and `engine.submit(r)` both work). Closing it cancels the request."""

    def __init__(self, seq: Sequence, queue: asyncio.Queue, wake: Callable[[], None]):
        self._wake = wake  # tells the engine's loop to look at cancellations now
        self._seq = seq
        self._queue = queue
        self._finished = False
        self.seed = seq.seed
        self.prompt_tokens = len(seq.prompt)

    def __await__(self):
        return self
        yield  # unreachable: makes this a generator, as __await__ must return an iterator

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:  # the consumer's task was cancelled (client gone, timeout)
            self.cancel()
            raise
        if event.finish_reason is not None:
            self._finished = True
        return event

    def cancel(self) -> None:
        """Cancel the request; the engine frees its slot at the next step."""
        if not self._finished:
            self._seq.cancelled = True
            self._wake()

    async def aclose(self) -> None:
        self.cancel()
        self._finished = True

    def __del__(self):
        if not self._finished:
            self._seq.cancelled = True  # no lock here: __del__ may run anywhere


