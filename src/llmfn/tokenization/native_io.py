"""The Python side of the native encoders' calls (native_spm, native_bpe): text to UTF-8, many
texts to one buffer with byte offsets, and the C side's flat ids back into one list per text."""

from __future__ import annotations

import gc
from collections.abc import Sequence

import numpy as np


def without_surrogates(text: str) -> str:
    """Surrogate pairs joined, lone surrogates (a JSON "\\ud800" escape) as U+FFFD, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def utf8(text: str) -> bytes:
    """UTF-8 of `text`, after `without_surrogates` where it holds surrogates."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return without_surrogates(text).encode("utf-8")


def utf8_joined(texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """The texts' UTF-8 concatenated, and offsets [n + 1] of each text's bytes in it: one encode
    call, and only the non-ASCII texts encoded again for their length."""
    try:
        joined = "".join(texts).encode("utf-8")
        lengths = (len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
    except UnicodeEncodeError:
        data = [utf8(t) for t in texts]
        joined, lengths = b"".join(data), map(len, data)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.fromiter(lengths, np.int64, len(texts)), out=offsets[1:])
    return joined, offsets


def split_ids(ids: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    """One list per text from the texts' ids laid end to end (`counts[k]` ids for text k)."""
    flat = ids[: int(counts.sum())].tolist()
    ends = np.cumsum(counts).tolist()
    starts = [0, *ends[:-1]] if ends else []
    # Thousands of new lists would trigger collections that walk the whole heap (a third of the
    # time for 1 MB of lines when torch is loaded); lists of ints cannot form a cycle.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return [flat[a:b] for a, b in zip(starts, ends, strict=True)]
    finally:
        if enabled:
            gc.enable()
