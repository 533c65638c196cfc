"""Scale-out over torch.distributed: tensor and pipeline parallel as transformations of a loaded model.

    import torch.distributed as dist, llmfn, llmfn.parallel
    dist.init_process_group("gloo")                   # launched by torchrun, or llmfn.parallel.launch
    model = llmfn.parallel.shard(llmfn.load("smollm2-135m-instruct"), pipeline=1)
    ids = list(llmfn.parallel.generate(model, prompt_ids, max_tokens=64))   # on every rank

`shard` returns this rank's Model: `llmfn.logits`, `llmfn.generate` and `llmfn.forward` run on it
unchanged (every rank calls them with the same arguments and gets the same result). Sampling agrees
across ranks when the seed does: `parallel.generate` draws a missing seed on rank 0 and shares it.
tensor.py documents the tensor-parallel layout, pipeline.py the stages, launch.py how ranks start."""

from __future__ import annotations

import torch.distributed as dist

from llmfn.errors import LlmfnError
from llmfn.generate import generate as generate_tokens
from llmfn.model import Model
from llmfn.parallel.pipeline import Stage, shard_pipeline
from llmfn.parallel.tensor import shard_tensor
from llmfn.sampling import fresh_seed


def shard(model: Model, group=None, *, pipeline: int = 1, vocab: str = "split") -> Model:
    """This rank's part of `model` over `group` (default: the world): `pipeline` stages of contiguous
    layers, each stage's layers split tensor-parallel over group size / pipeline ranks. Global rank
    s T + t (T ranks a stage) is rank t of stage s. Every process of the world must call it (it makes
    the process groups of the stages and lines, which torch.distributed.new_group asks of all)."""
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
                  line[stage_of + 1] if stage_of + 1 < pipeline else None, line[-1], lines[t])  # fmt: skip
    model = shard_pipeline(model, stage)
    return shard_tensor(model, stage_groups[stage_of], vocab=vocab) if tp > 1 else model


def agreed_seed(seed: int | None, src: int = 0) -> int:
    """`seed`, or when None one drawn on rank `src` and shared with every rank of the world."""
    if seed is not None:
        return seed
    box = [fresh_seed()]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def generate(model: Model, prompt_ids: list[int], *, seed: int | None = None, **kwargs):
    """llmfn.generate on a sharded model, called on every rank with the same arguments: a missing
    seed is agreed first, so sampled tokens are the same everywhere."""
    return generate_tokens(model, prompt_ids, seed=agreed_seed(seed), **kwargs)


__all__ = ["Stage", "agreed_seed", "generate", "shard", "shard_pipeline", "shard_tensor"]
