"""A worker's shutdown with a deadline. On SIGTERM or SIGINT Granian stops accepting connections and
waits for the open ones to end, which a long stream or a client that stalls mid-body would make
last forever. `Drain` bounds that wait: from the signal on, new requests on open connections get a
503 at once; requests under way run on for `timeout` seconds, then `expired` is set and the app ends
each of them: a stream with an error event and [DONE], anything else with a 503."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable

from llmfn.serve.http import shutting_down

log = logging.getLogger("llmfn.serve")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.draining = False
        self.expired = False
        self._waiters: set[asyncio.Future] = set()

    def install(self) -> None:
        """Watch for the stop signals on the running loop, beside the server's own handlers: the
        handler installed with signal.signal runs ours and then the one it replaces, while the loop's
        wake-up fd still delivers the signal to the handlers registered on the loop (Granian's)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; a server elsewhere shuts down by its own means
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                loop.call_soon_threadsafe(self.begin)
                if callable(previous) and previous is not signal.default_int_handler:
                    previous(signum, frame)

            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, handler)

    def begin(self) -> None:
        """Start draining (idempotent): the deadline passes `timeout` seconds from now."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: requests under way have %gs to finish", self.timeout)
        asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def _expire(self) -> None:
        self.expired = True
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)

    def deadline(self) -> asyncio.Future:
        """A future of the running loop that completes when the deadline passes (cancel it when done
        with it). One per caller rather than one asyncio.Event, which would bind the app to one loop."""
        waiter = asyncio.get_running_loop().create_future()
        if self.expired:
            waiter.set_result(None)
        else:
            self._waiters.add(waiter)
            waiter.add_done_callback(self._waiters.discard)
        return waiter

    async def bounded(self, work: Awaitable):
        """`work`, unless the drain deadline passes first: then it is cancelled (closing what it
        holds) and the request answered with a 503."""
        task = asyncio.ensure_future(work)
        stop = self.deadline()
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task.cancelled():
            raise shutting_down()
        return task.result()
