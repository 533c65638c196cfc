"""`shard`: this rank's part of a loaded model, tensor parallel within pipeline stages (the layouts:
tensor.py and pipeline.py)."""

from __future__ import annotations

import torch.distributed as dist

from llmfn.errors import LlmfnError
from llmfn.model import Model
from llmfn.parallel.pipeline import Stage, shard_pipeline
from llmfn.parallel.tensor import shard_tensor


def shard(model: Model, group=None, *, pipeline: int = 1, vocab: str = "split", micro_batches: int = 1) -> Model:
    """This rank's part of `model` over `group` (default: the world): `pipeline` stages of contiguous
    layers, each stage's layers split tensor-parallel over group size / pipeline ranks. Global rank
    s T + t (T ranks a stage) is rank t of stage s. Every process of the world must call it (it makes
    the process groups of the stages and lines, which torch.distributed.new_group asks of all).
    micro_batches: groups of rows a pipelined step of several rows runs as (pipeline.py)."""
    if not dist.is_initialized():
        raise LlmfnError("llmfn.parallel.shard needs a process group: run under torchrun (or "
                         "llmfn.parallel.launch) and call torch.distributed.init_process_group first")  # fmt: skip
    group = group or dist.group.WORLD
    ranks = dist.get_process_group_ranks(group)
    if pipeline < 1 or len(ranks) % pipeline:
        raise LlmfnError(f"pipeline parallel {pipeline} does not divide the {len(ranks)} ranks")
    tp = len(ranks) // pipeline
    stage_of, t = divmod(ranks.index(dist.get_rank()), tp)
    if pipeline == 1:
        return shard_tensor(model, group, vocab=vocab) if tp > 1 else model
    stage_groups = [dist.new_group([ranks[s * tp + i] for i in range(tp)]) for s in range(pipeline)]
    lines = [dist.new_group([ranks[s * tp + i] for s in range(pipeline)]) for i in range(tp)]
    line = [ranks[s * tp + t] for s in range(pipeline)]
    stage = Stage(stage_of, pipeline, line[stage_of - 1] if stage_of else None,
                  line[stage_of + 1] if stage_of + 1 < pipeline else None, line[-1], lines[t], micro_batches)  # fmt: skip
    model = shard_pipeline(model, stage)
    return shard_tensor(model, stage_groups[stage_of], vocab=vocab) if tp > 1 else model
