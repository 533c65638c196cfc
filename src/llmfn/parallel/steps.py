"""The Engine on a sharded model: rank 0 leads, the other ranks repeat its steps.

Rank 0 runs everything that decides (the engine's scheduler, its KV block bookkeeping and prefix
cache, sampling and, under `llmfn serve`, the HTTP server) on its shard of the model. `Leader.load`
wraps that shard's forward: before each step it broadcasts the step's inputs (tokens, positions,
the block table, logit_index, which attention), then runs it; every other rank, in `follow`, runs the
same forward on its own shard, so the collectives inside (tensor parallel's all-reduces, the
pipeline's sends) pair up. Every rank gets the full logits; only rank 0 samples, once.

A follower's KV pool mirrors rank 0's: the same number of blocks of the same size and dtype, laid out
for its own cfg (its share of the kv heads, its stage's layers). A step names blocks by id, so a
follower needs no scheduler, prefix cache or block bookkeeping. `Leader.load` sizes rank 0's pool so
that no rank's pool outgrows the budget: `model.extra["kv_share"]` is rank 0's KV bytes a position
over the largest rank's (SmolLM2 over 2 ranks: 1 kv head against 2, so 0.5); scale the engine's
kv_cache_memory by it (`llmfn serve` does).

Library use, every rank started by torchrun or llmfn.parallel.launch.spawn_ranks:

    import torch.distributed as dist, llmfn, llmfn.parallel as parallel
    parallel.launch.init()
    load = lambda: llmfn.load("smollm2-135m-instruct")
    if dist.get_rank() == 0:
        leader = parallel.Leader()                     # tensor=0: all the ranks pipeline leaves
        model = leader.load(load)                      # rank 0's shard, its forward broadcast
        with llmfn.Engine(model, kv_cache_memory=int(256 * 2**20 * model.extra["kv_share"])) as engine:
            print(engine.generate_many(["Hello"], max_tokens=16))
        leader.close()                                 # the followers return
    else:
        parallel.follow([load])                        # until rank 0 closes

Messages are int64 tensors broadcast from rank 0: a header (op, model index, then for a step its
sizes) and, for a step, one payload. Steps from several engines (several models) are serialized by a
lock, so every rank sees them in one order. An idle leader sends a heartbeat now and then, because a
collective that waits longer than the process group's timeout (gloo: 30 minutes) fails.

Failure: a rank that dies breaks the group; the next step fails on every rank (the engine ends the
requests in flight with an error), and `llmfn serve` then stops every rank. A forward that raises on
rank 0 after its inputs went out (a bug, not bad input: requests are checked before they are queued)
leaves the followers waiting in a collective until the group's timeout."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from llmfn import kernels
from llmfn.backend import forward_for
from llmfn.errors import LlmfnError
from llmfn.model import Model
from llmfn.models import llama
from llmfn.parallel import launch

STOP, STEP, LOAD, NOOP = range(4)
HEADER = 10  # op, model, rows, columns, table width, has logit_index, attention, blocks, block size, dtype
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATTENTIONS = (None, kernels.batch_invariant_attention)  # what the engine passes, by code
HEARTBEAT_S = 60.0


def _broadcast(values: torch.Tensor) -> torch.Tensor:
    dist.broadcast(values, src=0)
    return values


def _header(device, *fields: int) -> torch.Tensor:
    head = torch.zeros(HEADER, dtype=torch.int64, device=device)
    head[: len(fields)] = torch.tensor(fields, dtype=torch.int64)
    return head


def _kv_share(model: Model) -> float:
    """This rank's KV bytes a position over the largest rank's (every rank calls it)."""
    own = torch.tensor([model.cfg.num_layers * model.cfg.num_kv_heads], dtype=torch.int64, device=_device(model))
    every = [torch.empty_like(own) for _ in range(dist.get_world_size())]
    dist.all_gather(every, own)
    return own.item() / max(t.item() for t in every)


def _device(model: Model) -> torch.device:
    return model.params["norm"].device


def _shard(model: Model, tensor: int, pipeline: int, micro_batches: int) -> Model:
    from llmfn.parallel.sharding import shard

    world = dist.get_world_size()
    tensor = tensor or world // pipeline
    if tensor * pipeline != world:
        raise LlmfnError(f"--tensor-parallel {tensor} x --pipeline-parallel {pipeline} = {tensor * pipeline} "
                         f"ranks, but {world} were launched")  # fmt: skip
    return shard(model, pipeline=pipeline, micro_batches=micro_batches)


class Leader:
    """Rank 0's side: loads and shards models in step with the followers, and broadcasts each forward
    step of the models it returns. tensor 0: whatever pipeline leaves of the world; micro_batches:
    groups of rows a pipelined step runs as (llmfn.parallel.pipeline)."""

    def __init__(self, *, tensor: int = 0, pipeline: int = 1, micro_batches: int = 1, device: str = "cpu"):
        launch.init(device)
        if dist.get_rank() != 0:
            raise LlmfnError("the Leader runs on rank 0; the other ranks call llmfn.parallel.follow")
        self.tensor, self.pipeline, self.micro_batches = tensor, pipeline, micro_batches
        self.device = torch.device(launch.rank_device(device))
        self.loaded = 0
        self._lock = threading.Lock()  # one message (and its step's collectives) at a time
        self._last = time.monotonic()
        self._closed = threading.Event()
        threading.Thread(target=self._heartbeat, name="llmfn-leader-heartbeat", daemon=True).start()

    def load(self, load: Callable[[], Model]) -> Model:
        """The followers' load number `self.loaded` (their `loads[i]`) and rank 0's load(), in step.
        A causal LM comes back sharded, its forward leading the followers' and its pool share in
        extra["kv_share"]; any other model (an embedding model) comes back whole, rank 0's alone."""
        index = self.loaded
        with self._lock:
            self._send(_header(self.device, LOAD, index))
            model = load()  # first on rank 0: a first-use GGUF conversion into a shared cache runs once
            shardable = model.kind == "causal-lm" and "layers" in model.params
            _broadcast(torch.tensor([int(shardable)], device=self.device))
            self.loaded += 1
            if not shardable:
                return model
            part = _shard(model, self.tensor, self.pipeline, self.micro_batches)
            share = _kv_share(part)
        inner = forward_for(part)

        def leading_forward(params, cfg, tokens, positions, cache, logit_index=None, attention=None):
            return self._step(index, inner, params, cfg, tokens, positions, cache, logit_index, attention)

        extra = {**part.extra, "forward": leading_forward, "kv_share": share}
        return dataclasses.replace(part, extra=extra)

    def _step(self, index, inner, params, cfg, tokens, positions, cache, logit_index, attention):
        if cache.blocks is None:
            raise LlmfnError("a leading model runs the engine's paged steps; for llmfn.generate, call "
                             "llmfn.parallel.generate on every rank with a model from llmfn.parallel.shard")  # fmt: skip
        if attention not in ATTENTIONS:
            raise LlmfnError("a leading model's step takes the engine's attention or none")
        rows, cols = tokens.shape
        table = cache.blocks
        payload = [tokens.reshape(-1), positions.reshape(-1), table.reshape(-1).to(torch.int64)]
        if logit_index is not None:
            payload.append(logit_index.reshape(-1))
        head = _header(self.device, STEP, index, rows, cols, table.shape[1], logit_index is not None,
                       ATTENTIONS.index(attention), cache.k.shape[1], cache.k.shape[3], DTYPES.index(cache.k.dtype))  # fmt: skip
        with self._lock:
            self._send(head)
            _broadcast(torch.cat(payload).to(self.device))
            return inner(params, cfg, tokens, positions, cache, logit_index=logit_index, attention=attention)

    def _send(self, head: torch.Tensor) -> None:
        if self._closed.is_set():
            raise LlmfnError("the leader is closed: the other ranks have stopped")
        _broadcast(head)
        self._last = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S / 4):
            if time.monotonic() - self._last > HEARTBEAT_S and self._lock.acquire(blocking=False):
                try:
                    if not self._closed.is_set():
                        self._send(_header(self.device, NOOP))
                finally:
                    self._lock.release()

    def close(self) -> None:
        """Tell the followers to return (idempotent). Shut the engines down first."""
        with self._lock:
            if not self._closed.is_set():
                self._send(_header(self.device, STOP))
                self._closed.set()


def follow(loads: list[Callable[[], Model]], *, tensor: int = 0, pipeline: int = 1, micro_batches: int = 1,
           device: str = "cpu") -> None:  # fmt: skip
    """A rank other than 0: load, shard and run what rank 0's Leader broadcasts, until it closes.
    `loads[i]` must load what rank 0's i-th Leader.load loads."""
    launch.init(device)
    where = torch.device(launch.rank_device(device))
    models: dict[int, Model] = {}
    pools: dict[int, llama.KVCache] = {}
    head = torch.empty(HEADER, dtype=torch.int64, device=where)
    with torch.inference_mode():
        while True:
            op, index, rows, cols, width, has_index, attention, blocks, block_size, dtype = _broadcast(head).tolist()
            if op == STOP:
                return
            if op == LOAD:
                if not _broadcast(torch.zeros(1, dtype=torch.int64, device=where)).item():
                    continue  # rank 0 loaded a model it keeps whole
                if index >= len(loads):
                    raise LlmfnError(f"rank 0 loads model {index + 1}, this rank was given {len(loads)}")
                models[index] = _shard(loads[index](), tensor, pipeline, micro_batches)
                _kv_share(models[index])
            elif op == STEP:
                model = models[index]
                n = rows * cols
                payload = _broadcast(torch.empty(2 * n + rows * width + rows * has_index, dtype=torch.int64, device=where))
                tokens, positions = payload[:n].view(rows, cols), payload[n : 2 * n].view(rows, cols)
                table = payload[2 * n : 2 * n + rows * width].view(rows, width).to(torch.int32)
                logit_index = payload[2 * n + rows * width :] if has_index else None
                pool = pools.get(index)
                if pool is None or (pool.k.shape[1], pool.k.shape[3], pool.k.dtype) != (blocks, block_size, DTYPES[dtype]):
                    pool = pools[index] = _pool(model.cfg, blocks, block_size, DTYPES[dtype], where)
                forward_for(model)(model.params, model.cfg, tokens, positions, pool._replace(blocks=table),
                                   logit_index=logit_index, attention=ATTENTIONS[attention])  # fmt: skip


def _pool(cfg, blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> llama.KVCache:
    """A KV pool in the engine's layout for this rank's cfg. On CPU its zeros come from calloc, so
    pages are committed as blocks are first written (as the engine's own pool, engine/blocks.py)."""
    shape = (cfg.num_layers, blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
    if device.type != "cpu":
        return llama.KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
    import numpy as np

    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    return llama.KVCache(*(torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape) for _ in range(2)))


__all__ = ["Leader", "follow"]
