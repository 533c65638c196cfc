"""Scale-out over torch.distributed: tensor and pipeline parallel as transformations of a loaded model.

    import torch.distributed as dist, llmfn, llmfn.parallel
    dist.init_process_group("gloo")                   # launched by torchrun, or llmfn.parallel.launch
    model = llmfn.parallel.shard(llmfn.load("smollm2-135m-instruct"), pipeline=1)
    ids = list(llmfn.parallel.generate(model, prompt_ids, max_tokens=64))   # on every rank

`shard` returns this rank's Model: `llmfn.logits`, `llmfn.generate` and `llmfn.forward` run on it
unchanged (every rank calls them with the same arguments and gets the same result). Sampling agrees
across ranks when the seed does: `parallel.generate` draws a missing seed on rank 0 and shares it.
The Engine runs on rank 0's shard with the other ranks following its steps (`Leader`, `follow`).
tensor.py documents the tensor-parallel layout, pipeline.py the stages, steps.py the engine's
leader and followers, launch.py how ranks start."""

from __future__ import annotations

from llmfn.generate import generate as generate_tokens
from llmfn.model import Model
from llmfn.parallel.launch import agreed_seed
from llmfn.parallel.pipeline import Stage, shard_pipeline
from llmfn.parallel.sharding import shard
from llmfn.parallel.steps import Leader, follow
from llmfn.parallel.tensor import shard_tensor


def generate(model: Model, prompt_ids: list[int], *, seed: int | None = None, **kwargs):
    """llmfn.generate on a sharded model, called on every rank with the same arguments: a missing
    seed is agreed first, so sampled tokens are the same everywhere."""
    return generate_tokens(model, prompt_ids, seed=agreed_seed(seed), **kwargs)


__all__ = ["Leader", "Stage", "agreed_seed", "follow", "generate", "shard", "shard_pipeline", "shard_tensor"]
