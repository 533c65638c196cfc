"""Walks over a params pytree (nested dicts and lists of tensors and quantized leaves) done at load.

`finish_params` is the one pass every loader ends with: cast, move, lay out for decode and keep
shared tensors (a tied embed / lm_head) shared. A leaf met twice is mapped once, so ties survive
every walk here."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import mmap
from collections.abc import Callable

import torch

from llmfn.kernels import bf16
from llmfn.kernels import cpu as cpu_kernels
from llmfn.kernels.quant import is_quantized

# Tables derived at load in fp32 (rope frequencies, ALiBi slopes): moved, never cast, because the
# forward computes positions with them in fp32 whatever the weights' dtype.
FP32_TABLES = ("rope_inv_freq", "alibi_slopes")


def map_leaves(tree, f: Callable, memo: dict | None = None):
    """The same tree with f(leaf) at every leaf; a leaf object met more than once maps to one result."""
    memo = {} if memo is None else memo
    if isinstance(tree, dict):
        return {k: map_leaves(v, f, memo) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_leaves(v, f, memo) for v in tree]
    if id(tree) not in memo:
        memo[id(tree)] = f(tree)
    return memo[id(tree)]


# Decode's weights are carved from mappings of at least this many bytes on transparent huge pages.
ARENA_BYTES = 64 << 20


class _HugeArena:
    """Uninitialised CPU tensors for the weights decode streams once a token, carved one after another
    (64-byte aligned) from private anonymous mappings advised onto transparent huge pages. Linux's
    usual THP mode (madvise) gives huge pages only to memory that asks, and torch's allocator does not
    (llmfn no longer sets THP_MEM_ALLOC_ENABLE, which asked for every temporary: llmfn._env); one
    mapping per tensor left SmolLM2's 2-4 MB weights mostly on 4 KiB pages. On the AVX2 EPYC, llmfn_gemv
    streams 283 MB of huge pages at 22.6-25.6 GB/s against 19.2-22.4 on 4 KiB pages (five alternating
    runs, a C harness); SmolLM2 fp32 decode (532 of its 540 MB on huge pages, RSS unchanged) 42.5-49.4
    -> 44.3-51.8 tok/s, five alternating rounds, 4 of them faster. Quantized leaves too (`_carve_leaf`):
    SmolLM2 Q4_1 decode (94 MB on huge pages) 115-140 -> 123-150 tok/s over four alternating processes
    (+3-7% each), but within the VM's noise in one process (six rounds: 0.85-1.12x, mean 1.0x). Each
    tensor keeps its mapping alive; untouched tails are never resident."""

    def __init__(self):
        self.memory, self.used = None, 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if count == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
            return torch.empty(shape, dtype=dtype)
        start = -(-self.used // 64) * 64
        if self.memory is None or start + nbytes > len(self.memory):
            size = max(ARENA_BYTES, nbytes)
            self.memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: shmem, no THP
            self.memory.madvise(mmap.MADV_HUGEPAGE)
            start = 0
        self.used = start + nbytes
        return torch.frombuffer(self.memory, dtype=dtype, count=count, offset=start).view(shape)


def _decode_copy(w: torch.Tensor, column_major: bool, arena: _HugeArena) -> torch.Tensor:
    if column_major:
        return arena.take(tuple(w.shape[::-1]), w.dtype).copy_(w.t()).t()
    return arena.take(tuple(w.shape), w.dtype).copy_(w)


def release_freed_memory() -> None:
    """Hand the C heap's free memory back to the OS (glibc's malloc_trim). Loading frees its temporaries
    (the source of every copy above, GGUF blocks as repacked) inside the heap, where they stayed
    resident: SmolLM2 Q4_1 loaded at 462-521 MB RSS, 379-384 MB after the trim. A no-op where the C
    library has no malloc_trim."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


def _carve_leaf(w, arena: _HugeArena, copies: dict[int, torch.Tensor]):
    """A quantized leaf whose CPU tensors (packed weights, scales, offsets) are copies carved from the
    arena; a tensor two leaves share stays shared (copies: id -> copy)."""
    changes = {}
    for field in dataclasses.fields(w):
        t = getattr(w, field.name)
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            if id(t) not in copies:
                copies[id(t)] = arena.take(tuple(t.shape), t.dtype).copy_(t)
            changes[field.name] = copies[id(t)]
    return dataclasses.replace(w, **changes)


def _lays_out(w) -> bool:
    return isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point() and w.device.type == "cpu"


def decode_layout(tree, column_major: bool, memo: dict | None = None):
    """Copy every 2-D float CPU weight of a params pytree (shape unchanged, [out, in]) into fresh
    memory, in the layout decode's one-row matmuls stream fastest.

    Row-major for llmfn's C kernels (kernels/cpu.py). Column-major for MKL, used when they cannot be
    built: F.linear(x, w) then multiplies x by a contiguous [in, out] matrix, which MKL streams
    ~1.5x faster than row-major when x has one row (measured 10.2 -> 14.9 GB/s over SmolLM2's layer
    shapes, and prefill is no slower). Either way the copy leaves the mmap'd checkpoint for anonymous
    memory on huge pages (`_HugeArena`): 0.9 ms/token faster for SmolLM2 on 2 cores. Tensors shared
    by reference (a tied lm_head) stay shared."""
    arena = _HugeArena()
    return map_leaves(tree, lambda w: _decode_copy(w, column_major, arena) if _lays_out(w) else w, memo)


def finish_params(params: dict, dtype: torch.dtype, device: str | torch.device, *, layout: bool = True) -> dict:
    """The loaded params, ready to run, in one pass over the tree:
    - floating tensors cast to dtype and moved to device (FP32_TABLES only moved), others moved;
    - quantized leaves moved, with dtype as their activation dtype (on CPU, with layout, their tensors
      copied onto the huge pages too);
    - layout: 2-D float CPU weights copied into decode_layout's layout (column-major when the C
      kernels are unavailable);
    - tensors shared by reference (a tied embed / lm_head) stay one tensor;
    - no CPU tensor keeps viewing the checkpoint's file mapping (see `place`).
    bfloat16 on CPU with the C kernels (and layout) means bf16 weights, fp32 activations: 2-D weights
    become kernels.bf16.Bf16Weight leaves (half the bytes for decode to stream), every other float
    tensor fp32 (norms, biases: the residual stream and KV cache follow the norm's dtype) and quantized
    leaves take fp32 activations."""
    column_major = not cpu_kernels.available() if layout else False
    bf16_weights = layout and dtype == torch.bfloat16 and torch.device(device).type == "cpu" and cpu_kernels.available()
    activations = torch.float32 if bf16_weights else dtype
    memo: dict[int, object] = {}
    arena = _HugeArena()
    carved: dict[int, torch.Tensor] = {}

    def place(w, keep_fp32: bool):
        if id(w) in memo:
            return memo[id(w)]
        if is_quantized(w):
            out = w.to(device, activations)
            if layout and out.device.type == "cpu":
                out = _carve_leaf(out, arena, carved)
        elif isinstance(w, torch.Tensor) and w.is_floating_point() and not keep_fp32:
            out = w.to(device=device, dtype=dtype if bf16_weights and w.dim() == 2 else activations)
            if layout and _lays_out(out):
                out = bf16.wrap(_decode_copy(out, False, arena)) if bf16_weights else _decode_copy(out, column_major, arena)
        elif hasattr(w, "to"):
            out = w.to(device)
        else:
            out = w
        if out is w and isinstance(w, torch.Tensor) and w.device.type == "cpu":
            # Own the memory: one tensor still viewing the mmap'd checkpoint keeps the whole file
            # mapped, and every page that loading read stays resident (SmolLM2: +525 MB of RSS).
            out = w.clone()
        memo[id(w)] = out
        return out

    def walk(tree, keep_fp32: bool = False):
        if isinstance(tree, dict):
            return {k: walk(v, k in FP32_TABLES) for k, v in tree.items()}
        if isinstance(tree, list):
            return [walk(v) for v in tree]
        return place(tree, keep_fp32)

    return walk(params)
