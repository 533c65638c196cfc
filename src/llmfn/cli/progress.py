"""Progress display for the command line (tqdm on stderr), silent when stderr is not a terminal.

    with spinner("loading model"): ...          # elapsed time for a call with no steps to count
    with Progress("quantizing") as progress:     # a bar driven by a library progress callback
        quantize_checkpoint(..., progress=progress)
    show_first_use_notes()                       # the library's notes on GGUF conversions, C builds
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import Any


def enabled() -> bool:
    """Bars only on an interactive terminal (and never with LLMFN_NO_PROGRESS set)."""
    return sys.stderr.isatty() and not os.environ.get("LLMFN_NO_PROGRESS")


@contextmanager
def spinner(desc: str, delay: float = 0.5):
    """Show `desc: <elapsed>` while the block runs, if it takes longer than `delay` seconds."""
    if not enabled():
        yield
        return
    from tqdm import tqdm

    stop = threading.Event()

    def tick():
        if stop.wait(delay):
            return
        bar = tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False)
        while not stop.wait(0.2):
            bar.refresh()
        bar.close()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Progress:
    """A callable progress sink for library functions that take `progress=`.

    Called as `progress(done, total)` or `progress(done, total, item)`: `done` of `total` steps
    (tensors, layers) are finished and `item` names the last one. The bar is drawn on a terminal
    only; elsewhere calls are ignored."""

    def __init__(self, desc: str, unit: str = "tensor"):
        self.desc = desc
        self.unit = unit
        self._bar: Any = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, done: int, total: int | None = None, item: str | None = None, **_) -> None:
        if not enabled():
            return
        from tqdm import tqdm

        if self._bar is None or (total is not None and self._bar.total != total):
            self.close()
            self._bar = tqdm(desc=self.desc, total=total, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        if item:
            self._bar.set_postfix_str(item, refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _TqdmHandler(logging.Handler):
    """Log lines written above any bar or spinner on screen instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def show_first_use_notes() -> None:
    """On a terminal, print the library's first-use notes as `llmfn: ...` lines: a GGUF converted
    into the cache, C kernels compiled (what the server logs). Piped output stays clean."""
    if not enabled():
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("llmfn: %(message)s"))
    for name in ("llmfn.loading", "llmfn.cbuild"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
