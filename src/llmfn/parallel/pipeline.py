"""Pipeline (layer) parallel: contiguous groups of layers per stage, the residual stream sent stage to
stage with torch.distributed send / recv.

Stage s of P keeps layers [s L/P, (s+1) L/P) (and their KV cache: its cfg says num_layers = its count,
so init_cache makes only those); embed, the final norm and lm_head stay on every stage. A forward runs
the embedding everywhere (cheap, and it gives every stage the activation's shape), then stage s > 0
receives the stream from stage s - 1 in its place, runs its layers with the backend's layer stack
(the fused C decode step included: a stage is a plain, shorter model), sends the result on, and the
last stage broadcasts the final stream to all stages, which then compute the same logits. Every layer
runs the same arithmetic as in one process, so the logits are bitwise those of one process.

With tensor parallel as well (llmfn.parallel.shard), stage s is a tensor-parallel group of T ranks:
global rank s T + t talks to rank (s +- 1) T + t, and the broadcast runs over the T "lines"
{t, T + t, 2T + t, ...}.

Micro-batches (`micro_batches` M > 1): a step of several rows on a paged cache (the engine's decode
steps) runs as M groups of rows, each sent on (isend) as soon as the stage has computed it, so stage
s works on group i + 1 while stage s + 1 works on group i: M + P - 1 slots instead of M P. A row's
result does not depend on the other rows in its step (the engine's batch invariance), so this is
still bitwise one process. Whether it pays is measured (benchmarks/RESULTS.md): each group streams the
stage's weights again, which a decode step bound by memory bandwidth feels."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llmfn.backend import fused_layers
from llmfn.errors import LlmfnError
from llmfn.model import Model
from llmfn.models import llama


@dataclass(frozen=True)
class Stage:
    """Where this rank sits in the pipeline: global ranks of its neighbours (None at the ends), the
    last stage's rank on its line and the line's process group (for the final broadcast)."""

    index: int
    count: int
    prev: int | None
    next: int | None
    last: int
    line: Any
    micro_batches: int = 1


def stage_layers(stage: Stage, params, cfg, x: torch.Tensor, rope, positions, cache, attention=None) -> torch.Tensor:
    """llama.decoder_layers over the whole pipeline, seen from one stage: receive, run ours, send on,
    and end with the last stage's result on every stage."""
    groups = min(stage.micro_batches, x.shape[0]) if cache.blocks is not None else 1
    if groups > 1:
        x = _micro_batched(stage, groups, params, cfg, x, rope, positions, cache, attention)
    else:
        if stage.prev is not None:
            dist.recv(x, src=stage.prev)  # x had the embedding: the same shape and dtype as the stream
        x = fused_layers(params, cfg, x, rope, positions, cache, attention).contiguous()
        if stage.next is not None:
            dist.send(x, dst=stage.next)
    dist.broadcast(x, src=stage.last, group=stage.line)
    return x


def _micro_batched(stage: Stage, groups: int, params, cfg, x, rope, positions, cache, attention) -> torch.Tensor:
    """stage_layers' receive / compute / send, one group of rows at a time (see the module doc)."""
    bounds = [g * x.shape[0] // groups for g in range(groups + 1)]
    outs, sends = [], []
    for start, stop in itertools.pairwise(bounds):
        rows = slice(start, stop)
        part = x[rows].contiguous()
        if stage.prev is not None:
            dist.recv(part, src=stage.prev)
        part_rope = llama.RopeTables(*(None if t is None else t[rows] for t in rope))
        part = fused_layers(params, cfg, part, part_rope, positions[rows], cache._replace(blocks=cache.blocks[rows]),
                            attention).contiguous()  # fmt: skip
        if stage.next is not None:
            sends.append(dist.isend(part, dst=stage.next))
        outs.append(part)
    for send in sends:
        send.wait()
    return torch.cat(outs)


def stage_forward(stage: Stage, params, cfg, tokens, positions, cache, logit_index=None, attention=None):
    """llama.forward with the pipeline's layer stack (the signature of backend.forward_for's forwards)."""
    layers = functools.partial(stage_layers, stage)
    return llama.forward(params, cfg, tokens, positions, cache, logit_index=logit_index, attention=attention,
                         layers=layers)  # fmt: skip


def layer_range(num_layers: int, index: int, count: int) -> tuple[int, int]:
    """Stage `index` of `count`'s contiguous layers [start, stop)."""
    if count > num_layers:
        raise LlmfnError(f"pipeline parallel {count}: the model has only {num_layers} layers")
    return index * num_layers // count, (index + 1) * num_layers // count


def shard_pipeline(model: Model, stage: Stage) -> Model:
    """This stage's part of a loaded Llama-layout model: its layers, a cfg with their count, and the
    pipeline forward in model.extra["forward"] (which backend.forward_for runs)."""
    if model.kind != "causal-lm" or "layers" not in model.params:
        raise LlmfnError("pipeline parallel takes a Llama-layout causal language model")
    start, stop = layer_range(model.cfg.num_layers, stage.index, stage.count)
    params = {**model.params, "layers": model.params["layers"][start:stop]}
    cfg = dataclasses.replace(model.cfg, num_layers=stop - start)
    extra = {**model.extra, "forward": functools.partial(stage_forward, stage), "pipeline_parallel": (stage.index, stage.count)}
    return dataclasses.replace(model, cfg=cfg, params=params, extra=extra)
