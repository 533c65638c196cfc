"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, reference-counted, with full prompt
blocks kept after their sequence ends for prefix caching and evicted least recently used.

Block 0 is scratch: the rows of a decode step that hold no sequence point there (their junk writes
land in it, nothing reads it). A cached block is named by its tokens and its parent's name: a chain
key (parent id, the block's tokens), compared exactly (no hash collisions can hand one prompt
another's keys). Only blocks that prefill wrote in whole are cached (see core.py: the KV a decode
step writes is not bitwise the KV a prefill writes, so only prefill-written blocks may be shared).
Shared blocks are full and never written again, so sharing needs no copy-on-write: a sequence's
writes always go to the blocks past its matched prefix, which it owns alone."""

from __future__ import annotations

import heapq
import os
import re
from collections import OrderedDict

import torch

from llmfn.errors import LlmfnError

SCRATCH = 0  # the block idle decode rows write to

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip


def parse_bytes(value: int | str, name: str = "kv_cache_memory") -> int:
    """A memory size: an integer number of bytes, or a string like "512MiB", "1.5 GiB", "800MB"."""
    if isinstance(value, bool):
        raise LlmfnError(f"{name} must be a size like 512MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise LlmfnError(f"{name} must be a size like 512MiB, 2GiB or a number of bytes, got {value!r}")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise LlmfnError(f"{name} must be positive, got {value!r}")
    return size


def default_kv_cache_memory(device: torch.device) -> int:
    """The KV budget when none is given: on CPU a tenth of the machine's memory, at most 1 GiB (an 8 GB
    laptop gives ~800 MiB, and pages the cache does not use are never touched); on CUDA a third of
    the free device memory, at most 8 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(8 << 30, free // 3)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(1 << 30, total // 10)


def zeros_untouched(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor whose memory is committed page by page as it is first written: a large CPU
    allocation through calloc is fresh zero pages from the OS, so resident memory follows the blocks
    in use instead of the budget (torch.zeros would write every page up front)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class BlockPool:
    """Which of `num_blocks` blocks are free, used (reference-counted) or cached (kept, evictable)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise LlmfnError(f"the KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free = list(range(1, num_blocks))  # a heap: the lowest ids first keep touched memory compact
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, oldest first
        self._key_of: dict[int, tuple] = {}  # cached block -> its chain key
        self._block_of: dict[tuple, int] = {}  # chain key -> cached block
        self._cid: dict[int, int] = {}  # cached block -> the id its children's keys name it by
        self._next_cid = 1

    def available(self) -> int:
        """Blocks an allocation can take: free ones and cached ones nobody uses."""
        return len(self._free) + len(self._evictable)

    def used(self) -> int:
        """Blocks some sequence holds (the scratch block not counted)."""
        return self.num_blocks - 1 - len(self._free) - len(self._evictable)

    def cached(self) -> int:
        return len(self._key_of)

    def allocate(self) -> int:
        """A block for one owner: a free one, else the least recently used cached one (forgotten)."""
        if self._free:
            block = heapq.heappop(self._free)
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
        else:
            raise LlmfnError("the KV cache pool is exhausted")  # the engine checks available() first
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, last first (so a chain's tail is evicted before its head)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)

    def match(self, parent: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block holding `tokens` after the block `parent` (0: the prompt's start), with a
        reference taken, or None."""
        if parent and parent not in self._cid:
            return None
        block = self._block_of.get((self._cid[parent] if parent else 0, tokens))
        if block is None:
            return None
        if self.refs[block] == 0:
            del self._evictable[block]
        self.refs[block] += 1
        return block

    def register(self, block: int, parent: int, tokens: tuple[int, ...]) -> None:
        """Offer a full, prefill-written block for reuse (a no-op when the same chain is cached already)."""
        if parent and parent not in self._cid:  # the parent is not cached: nobody can reach this block
            return
        key = (self._cid[parent] if parent else 0, tokens)
        if key in self._block_of or block in self._key_of:
            return
        self._block_of[key] = block
        self._key_of[block] = key
        self._cid[block] = self._next_cid
        self._next_cid += 1

    def forget(self, blocks: list[int]) -> None:
        """Take blocks out of the cache (their contents may be partial: a failed forward)."""
        for block in blocks:
            if block in self._key_of:
                self._forget(block)
                if block in self._evictable:  # unreferenced: free now
                    del self._evictable[block]
                    heapq.heappush(self._free, block)

    def _forget(self, block: int) -> None:
        del self._block_of[self._key_of.pop(block)]
        del self._cid[block]
