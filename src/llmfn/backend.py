"""How a model's forward runs here: the model file is the reference, this module picks an equal
function that is faster on this machine, once per model (as `jax.jit` chooses how to run a function).

- Llama-layout models on CPU: `fused_forward`, the model's forward whose layer stack runs as one C
  call for fp32 decode-sized steps (kernels/cpu.py `decoder_layers`, bitwise the op-by-op result);
  other steps take the model's own layers.
- torch.compile: the whole forward compiles as one graph (fullgraph=True: no graph breaks) with static
  shapes; positions are tensors, so successive decode steps reuse the graph instead of recompiling,
  and KV cache lengths are bucketed to powers of two so requests of similar length share a graph.
  Whether it pays is measured, not assumed: on this project's 2-core CPU (torch 2.13, MKL) the
  compiled SmolLM2-135M decode step ran at 19.2 tok/s against 21.4 tok/s eager (benchmarks/
  RESULTS.md), because decode there is bound by streaming the weights and inductor's graph does not
  beat MKL at it; llmfn's C decode kernels (~47 tok/s) are opaque to a compiled graph, which takes
  the torch ops instead. So compile is off by default on CPU, and on by default on CUDA (where
  per-op launch overhead dominates) for models above COMPILE_MIN_PARAMS parameters.
  LLMFN_COMPILE=0/1 or load(..., compile=False/True) overrides the default. Inductor's caches go to
  LLMFN_HOME/inductor so a second run skips most of the compile time."""

from __future__ import annotations

import functools
import os

import torch

from llmfn import models
from llmfn._env import home
from llmfn.kernels import cpu
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


def _fused_layer_structs(params, cfg: llama.LlamaConfig, x, rope: llama.RopeTables, positions,
                         cache: llama.KVCache) -> list | None:
    """The layers' C structs when this step may run them as one C call: fp32 decode-sized CPU inputs,
    caches laid out as kernels.qkv_attention's C path takes them, weights the fused kernel takes."""
    tables = [t for t in (rope.cos, rope.sin) if t is not None]
    ok = (
        positions.dtype == torch.int64
        and positions.shape == x.shape[:2]
        and x.is_contiguous()
        and cpu.cache_layout_ok(cache.k, cache.v)
        and (cache.k.shape[0], cache.k.shape[2]) == (len(params["layers"]), cfg.num_kv_heads)
        and cache.k.shape[-1] == cfg.head_dim
        and all(t.shape == (*x.shape[:2], cfg.head_dim // 2) for t in tables)
        and cpu.takes(x, *tables)
    )
    if not ok:
        return None
    fields = cpu.stack_fields(params["layers"], cfg)
    return None if any(f is None for f in fields) else fields


def fused_layers(params, cfg: llama.LlamaConfig, x, rope: llama.RopeTables, positions, cache: llama.KVCache,
                 attention=None) -> torch.Tensor:
    """llama.decoder_layers, as one C call when the step fits the fused kernel. That kernel is
    batch-invariant itself, so it stands in for an attention op marked `batch_invariant = True` (the
    engine's), never for any other op a caller passes."""
    fields = None if _own_attention(attention) else _fused_layer_structs(params, cfg, x, rope, positions, cache)
    if fields is None:
        return llama.decoder_layers(params, cfg, x, rope, positions, cache, attention)
    return cpu.decoder_layers(x, fields, cfg, rope.cos, rope.sin, rope.q_scale, positions, cache.k, cache.v,
                              params.get("alibi_slopes"), cache.blocks)  # fmt: skip


def fused_forward(params, cfg: llama.LlamaConfig, tokens, positions, cache: llama.KVCache, logit_index=None,
                  attention=None) -> tuple[torch.Tensor, llama.KVCache]:
    """llama.forward with `fused_layers` as its layer stack: the same results, faster decode on CPU.
    A decode-sized step whose embedding and lm_head the C code takes too runs whole as one C call
    (`fused_step`): ~0.15 ms less Python a token, 3-8% of an int4 / Q8_0 SmolLM2 step."""
    return llama.forward(params, cfg, tokens, positions, cache, logit_index=logit_index, attention=attention,
                         layers=fused_layers, whole=fused_step)


def _own_attention(attention) -> bool:
    """A caller's attention op the fused kernel must not replace (it stands in for the engine's
    batch-invariant one only)."""
    return attention is not None and not getattr(attention, "batch_invariant", False)


def fused_step(params, cfg: llama.LlamaConfig, tokens, positions, cache: llama.KVCache, attention=None):
    """llama.forward's logits as one C call (embedding, layers, norm, lm_head), or None where it cannot."""
    ends = None if _own_attention(attention) else cpu.step_fields(params["embed"], params["norm"], params["lm_head"])
    if ends is None or tokens.dtype != torch.int64 or tokens.dim() != 2:
        return None
    tokens = tokens.contiguous()  # held by this name while the C code reads it
    x = torch.empty(*tokens.shape, cfg.hidden_size)
    rope = llama.rope_tables(params, cfg, positions)
    fields = _fused_layer_structs(params, cfg, x, rope, positions, cache)
    if fields is None:
        return None
    logits = torch.empty(*tokens.shape, params["lm_head"].shape[0])
    cpu.decoder_layers(x, fields, cfg, rope.cos, rope.sin, rope.q_scale, positions, cache.k, cache.v,
                       params.get("alibi_slopes"), cache.blocks, step=(tokens, ends, logits))
    return logits


def forward_for(model: Model, *, decode: bool = False):
    """The forward to run `model` with: compiled for decode steps when should_compile says so, else
    the fused forward for Llama-layout models, else the family's own. A model that carries its own
    forward runs it (llmfn.parallel's pipeline stages: the same math, with sends between layers)."""
    if "forward" in model.extra:
        return model.extra["forward"]
    if decode and should_compile(model):
        return compiled_forward()
    arch = models.family(model.cfg)
    return fused_forward if arch is llama else arch.forward


def row_invariant_rows(model: Model) -> int:
    """How many rows a decode step of `model` may have while each row's result stays independent of
    the number of rows: llmfn's C kernels (fp32 activations on CPU, up to cpu.MAX_ROWS rows) compute
    every output in an order fixed by its column alone, whatever the row count. 0 where the step runs
    on torch's kernels (MKL / oneDNN tile their rows by the row count; the engine then keeps every
    decode step at one fixed row count)."""
    norm = model.params["norm"]
    if models.family(model.cfg) is not llama or should_compile(model) or not cpu.fp32_cpu(norm):
        return 0
    return cpu.MAX_ROWS if cpu.available() else 0
