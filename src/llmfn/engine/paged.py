"""The engine's KV memory: one pool of blocks (the tensors, in the layout models/llama.py's KVCache
takes), the BlockPool bookkeeping (blocks.py), and the block tables a step reads through. A sequence
holds a list of block ids in position order; this module hands them out, shares cached prompt
blocks and builds the tables. Why only whole prefill chunks are shared: core.py and the engine's
module docstring."""

from __future__ import annotations

import torch

from llmfn.engine.blocks import SCRATCH, BlockPool, default_kv_cache_memory, parse_bytes, zeros_untouched
from llmfn.errors import LlmfnError
from llmfn.models.llama import KVCache

KV_CACHE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def pool_dtype(name: str | torch.dtype | None, activations: torch.dtype) -> torch.dtype:
    """The KV pool's dtype: the model's activations' (None), or for an fp32 model a 16-bit cache
    ("bfloat16" / "float16": keys and values rounded once when written, attention still in fp32; the
    same memory holds twice the positions)."""
    dtype = KV_CACHE_DTYPES.get(name, name) if isinstance(name, str) else name or activations
    if dtype not in KV_CACHE_DTYPES.values():
        raise LlmfnError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    if dtype != activations and activations != torch.float32:
        raise LlmfnError(f"kv_cache_dtype {name!r}: a {activations} model keeps its KV cache in {activations} "
                         "(a 16-bit cache is offered for fp32 models)")  # fmt: skip
    return dtype


def size_pool(kv_cache_memory: int | str | None, bytes_per_token: int, block_size: int, context: int,
              max_model_len: int | None, device: torch.device) -> tuple[int, int]:
    """(blocks in the pool, max_model_len) for a budget (default: blocks.default_kv_cache_memory): the
    longest sequence is the model's context or the given max_model_len, capped by what the pool holds."""
    budget = parse_bytes(kv_cache_memory) if kv_cache_memory is not None else default_kv_cache_memory(device)
    num_blocks = budget // (bytes_per_token * block_size)
    if max_model_len is not None and not 1 < max_model_len <= context:
        raise LlmfnError(f"max_model_len must be in [2, {context}] (the model's context), got {max_model_len}")
    longest = min(max_model_len or context, (num_blocks - 1) * block_size)  # one block is scratch
    if longest < 2:
        raise LlmfnError(
            f"kv_cache_memory={budget} bytes holds {max(num_blocks, 0)} blocks of {block_size} positions at "
            f"{bytes_per_token} bytes a position: too few for a sequence; give it more memory"
        )
    return num_blocks, longest


class PagedKV:
    def __init__(self, cfg, num_blocks: int, block_size: int, chunk: int, prefix_cache: bool,
                 dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.chunk = chunk  # the prefill chunk: prefixes are shared in whole chunks
        self.prefix_cache = prefix_cache
        self.device = device
        self.pool = BlockPool(num_blocks)
        shape = (cfg.num_layers, num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.cache = KVCache(zeros_untouched(shape, dtype, device), zeros_untouched(shape, dtype, device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.cache.k, self.cache.v))

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def match(self, prompt: list[int]) -> list[int]:
        """Cached blocks holding the prompt's first whole prefill chunks (references taken). Never the
        chunk of the last prompt token (its logits are needed), and whole chunks only: the rest of the
        prompt is then prefilled in the same chunks as a cold prefill, so every bit is the same."""
        if not self.prefix_cache:
            return []
        bs, per_chunk = self.block_size, self.chunk // self.block_size
        limit = (len(prompt) - 1) // self.chunk * per_chunk  # blocks in the reusable chunks
        blocks: list[int] = []
        while len(blocks) < limit:
            i = len(blocks)
            block = self.pool.match(blocks[-1] if blocks else 0, tuple(prompt[i * bs : (i + 1) * bs]))
            if block is None:
                break
            blocks.append(block)
        keep = len(blocks) // per_chunk * per_chunk
        self.pool.release(blocks[keep:])
        return blocks[:keep]

    def grow(self, blocks: list[int], positions: int) -> bool:
        """Append blocks until `blocks` holds `positions` positions; False (and as many as there were)
        when the pool runs out."""
        while len(blocks) * self.block_size < positions:
            if not self.pool.available():
                return False
            blocks.append(self.pool.allocate())
        return True

    def register(self, prompt: list[int], blocks: list[int], start: int, end: int) -> None:
        """Prefill wrote prompt positions [start, end): a whole chunk's blocks may be shared."""
        if not self.prefix_cache or end % self.chunk:
            return
        bs = self.block_size
        for i in range(start // bs, end // bs):
            self.pool.register(blocks[i], blocks[i - 1] if i else 0, tuple(prompt[i * bs : (i + 1) * bs]))

    def view(self, rows: list[list[int] | None], width: int | None = None) -> KVCache:
        """The pool read through a block table [len(rows), width] (int32): each row's blocks, the
        scratch block for rows that are None and past each row's last block."""
        width = width or max(len(b) for b in rows if b)
        table = torch.full((len(rows), width), SCRATCH, dtype=torch.int32)
        for r, blocks in enumerate(rows):
            if blocks:
                table[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return self.cache._replace(blocks=table.to(self.device))
