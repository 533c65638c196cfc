"""When and how the decode step is compiled with torch.compile.

The whole forward compiles as one graph (fullgraph=True: no graph breaks) with static shapes;
positions are tensors, so successive decode steps reuse the graph instead of recompiling, and KV
cache lengths are bucketed to powers of two so requests of similar length share a graph.
Whether it pays is measured, not assumed: on this project's 2-core CPU (torch 2.13, MKL) the
compiled SmolLM2-135M decode step ran at 19.2 tok/s against 21.4 tok/s eager (benchmarks/
RESULTS.md), because decode there is bound by streaming the weights and inductor's graph does not
beat MKL at it; llmfn's C decode kernels (kernels/cpu.py, ~47 tok/s) are opaque to a compiled graph,
which takes the torch ops instead. So compile is off by default on CPU, and on by default on CUDA
(where per-op launch overhead dominates) for models above COMPILE_MIN_PARAMS parameters.
LLMFN_COMPILE=0/1 or load(..., compile=False/True) overrides the default. Inductor's caches go to
LLMFN_HOME/inductor so a second run skips most of the compile time."""

from __future__ import annotations

import functools
import os

import torch

from llmfn.loading.registry import home
from llmfn.model import Model
from llmfn.models import llama

COMPILE_MIN_PARAMS = 50_000_000


def param_count(tree) -> int:
    if isinstance(tree, dict):
        return sum(param_count(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(param_count(v) for v in tree)
    return tree.numel() if isinstance(tree, torch.Tensor) else getattr(tree, "numel", lambda: 0)()


def should_compile(model: Model) -> bool:
    env = os.environ.get("LLMFN_COMPILE")
    if env is not None:
        return env.lower() not in ("0", "false", "no", "")
    choice = model.extra.get("compile")
    if choice is None:
        on_cuda = model.params["norm"].is_cuda
        choice = model.extra["compile"] = on_cuda and param_count(model.params) >= COMPILE_MIN_PARAMS
    return choice


@functools.cache
def compiled_forward():
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(home() / "inductor"))
    # Static shapes: cache lengths come in power-of-two buckets (generate.cache_length), each
    # compiled once and kept in inductor's on-disk cache.
    return torch.compile(llama.forward, fullgraph=True, dynamic=False)


def decode_forward(model: Model):
    """The forward for decode steps: compiled or eager, per should_compile."""
    return compiled_forward() if should_compile(model) else llama.forward
