"""Tensor parallel as a transformation of params + cfg (the shape of gpt-fast's tp.py): each rank of a
group keeps its slice of every layer's weights and a cfg with its share of the heads and of the MLP
width; the model code (llmfn.models.llama) runs unchanged on it.

Per layer (n ranks, rank r; Hq query heads, Hk kv heads, F the MLP width):
    wqkv / bqkv   column-parallel: the q rows of the rank's query heads and the k / v rows of their kv
                  heads: whole GQA groups per rank when Hk >= n, else (Hk < n, GQA / MQA) each rank
                  keeps the one kv head its query heads share (replicated over n / Hk ranks)
    w_gate_up     column-parallel: rows [r F/n, (r+1) F/n) of the gate half and of the up half
    wo, w_down    row-parallel: the matching input columns, as a `RowParallel` leaf whose linear is the
                  local product summed over the group (one all-reduce); bo / b_down are added after it
    norms, rope   replicated
    embed, lm_head  vocab-parallel (`VocabShard`: rows [r V/n, (r+1) V/n); the lookup is masked and
                  all-reduced, the head's logits all-gathered) when n divides V, else replicated
cfg: the rank's own query heads, kv heads and MLP width (head_split: whole GQA groups, so an uneven
split where the groups do not divide, as SmolLM2's 3 over 2 ranks); vocab_size stays V (every rank
gets the full logits). Quantized leaves (llmfn.kernels.quant Int4Weight / Int8Weight) are sliced the
same way, along with their group scales; a row-parallel slice must start on a quantization group.

So two collectives a layer, both in `linear`, where the model already calls it: the all-reduce after
attention's output projection and after the MLP's down projection. After them every rank holds the
same residual stream, bit for bit (the reduction's result is shared), so the logits, and sampling
with the same seed, agree on every rank. The sums run in another order than one process's: results
are within float rounding of it, not bitwise (tests/test_parallel.py holds 1e-4 on the logits).

The fused C decode step (backend.fused_layers) cannot stop mid-layer for the all-reduce: it declines
layers holding a RowParallel leaf (no `fused_args`), and the op-by-op path runs, each op still on
llmfn's C kernels."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.utils._pytree as pytree

from llmfn.errors import LlmfnError
from llmfn.kernels.bf16 import Bf16Weight
from llmfn.kernels.linear import embedding, linear
from llmfn.kernels.quant import Int4Weight, Int8Weight
from llmfn.model import Model

# Seconds spent in this module's collectives and their count, per process (benchmarks read them).
COMM = {"seconds": 0.0, "calls": 0}


def all_reduce(y: torch.Tensor, group) -> torch.Tensor:
    """The sum of y over the group, on every rank. Under torch.compile a functional collective (it
    traces); eager, the in-place c10d call on y (a fresh product, ours to overwrite), which on gloo
    costs a third of the functional op's wrapping (1.1 ms against 3.0 ms measured on a busy 2-core host)."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(y, "sum", group)
    start = time.perf_counter()
    dist.all_reduce(y, group=group)
    COMM["seconds"] += time.perf_counter() - start
    COMM["calls"] += 1
    return y


def all_gather_last(y: torch.Tensor, group) -> torch.Tensor:
    """Every rank's y concatenated along the last dim, in rank order."""
    y = y.contiguous()
    if torch.compiler.is_compiling():
        parts = funcol.all_gather_tensor(y, 0, group).chunk(dist.get_world_size(group))
        return torch.cat(parts, -1)
    start = time.perf_counter()
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, y, group=group)
    COMM["seconds"] += time.perf_counter() - start
    COMM["calls"] += 1
    return torch.cat(parts, -1)


class _Shard:
    """What a sharded leaf tells about itself from its local part (`local`): device, dtype, numel."""

    local: Any

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    def numel(self) -> int:
        return self.local.numel()


@dataclass(frozen=True, eq=False)
class RowParallel(_Shard):
    """A row-parallel weight: this rank's input columns [out, in/n] of a [out, in] weight (a tensor or
    a quantized leaf). `linear(x)` takes this rank's slice of the inputs and returns the full product,
    summed over the group. No `fused_args`: the fused C layer declines it (see the module doc)."""

    local: Any
    group: Any

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.local.shape)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(linear(x, self.local), self.group)


@dataclass(frozen=True, eq=False)
class VocabShard(_Shard):
    """Rows [start, start + rows) of a [V, D] embedding / lm_head, the group together holding all V.
    `embedding(ids)` looks up the ids this rank holds (zeros for the others) and sums over the group
    (exact: one rank contributes each row); `linear(x)` returns the full logits [..., V], gathered."""

    local: Any
    start: int
    group: Any

    @property
    def shape(self) -> tuple[int, int]:
        rows, dim = self.local.shape
        return (rows * dist.get_world_size(self.group), dim)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.local.shape[0]
        local_ids = ids - self.start
        here = (local_ids >= 0) & (local_ids < rows)
        x = embedding(self.local, local_ids.clamp(0, rows - 1))  # [..., D]
        return all_reduce(torch.where(here[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device)), self.group)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(linear(x, self.local), self.group)  # [..., V]


for _leaf, _fields in ((RowParallel, ("local",)), (VocabShard, ("local",))):
    pytree.register_pytree_node(
        _leaf,
        lambda w, f=_fields: ([getattr(w, n) for n in f], {k: v for k, v in vars(w).items() if k not in f}),
        lambda children, ctx, cls=_leaf, f=_fields: cls(**dict(zip(f, children, strict=True)), **ctx),
        serialized_type_name=f"llmfn.parallel.tensor.{_leaf.__name__}",
    )


# ---------------------------------------------------------------------------------------------
# Slicing weights (dense or quantized) by output rows and by input columns


def take_rows(w, index: torch.Tensor):
    """Output features `index` (int64) of a weight [out, in] or a bias [out], as a new (copied) leaf."""
    if isinstance(w, torch.Tensor):
        return w[index.to(w.device)].contiguous()
    if isinstance(w, Int4Weight):
        i = index.to(w.device)
        zeros = None if w.zeros is None else w.zeros[i].contiguous()
        return Int4Weight(w.qweight[i].contiguous(), w.scales[i].contiguous(), w.offsets[i].contiguous(),
                          w.group_size, w.dtype, zeros)  # fmt: skip
    if isinstance(w, Int8Weight):
        i = index.to(w.device)
        return Int8Weight(w.qweight[i].contiguous(), w.scales[i].contiguous(), w.group_size, w.dtype)
    if isinstance(w, Bf16Weight):
        return Bf16Weight(w.w[index.to(w.device)].contiguous())
    raise LlmfnError(f"tensor parallel cannot shard a {type(w).__name__} weight")


def take_columns(w, start: int, stop: int):
    """Input features [start, stop) of a weight [out, in], as a new (copied) leaf. A quantized slice
    must start and stop on its quantization groups."""
    if isinstance(w, torch.Tensor):
        return w[:, start:stop].contiguous()
    if isinstance(w, Bf16Weight):
        return Bf16Weight(w.w[:, start:stop].contiguous())
    if isinstance(w, (Int4Weight, Int8Weight)):
        g = w.group_size
        if g == w.shape[1] and isinstance(w, Int8Weight):  # one scale a row (per channel): the slice keeps it
            return Int8Weight(w.qweight[:, start:stop].contiguous(), w.scales.clone(), stop - start, w.dtype)
        if start % g or stop % g:
            raise LlmfnError(f"tensor parallel: input features [{start}, {stop}) of a quantized weight do not "
                             f"fall on its groups of {g}; use fewer ranks or a smaller group size")  # fmt: skip
        scales = w.scales[:, start // g : stop // g].contiguous()
        if isinstance(w, Int8Weight):
            return Int8Weight(w.qweight[:, start:stop].contiguous(), scales, g, w.dtype)
        zeros = None if w.zeros is None else w.zeros[:, start // g : stop // g].contiguous()
        return Int4Weight(w.qweight[:, start // 2 : stop // 2].contiguous(), scales,
                          w.offsets[:, start // g : stop // g].contiguous(), g, w.dtype, zeros)  # fmt: skip
    raise LlmfnError(f"tensor parallel cannot shard a {type(w).__name__} weight")


def _arange(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# The transformation


@dataclass(frozen=True)
class HeadSplit:
    """Which heads and MLP rows rank r of n keeps."""

    q: tuple[int, int]  # query heads [start, stop)
    kv: tuple[int, int]  # kv heads [start, stop)
    mlp: tuple[int, int]  # MLP width [start, stop)


def head_split(cfg, rank: int, n: int) -> HeadSplit:
    """Rank r's heads and MLP rows; LlmfnError when cfg's heads do not split over n ranks.

    With at least n kv heads, each rank takes whole GQA groups (a kv head with its query heads), as
    evenly as they go: SmolLM2's 3 groups of 3 heads go 1 + 2 over 2 ranks. With fewer kv heads than
    ranks, the n / Hk ranks sharing a kv head each keep a copy of it and an equal part of its group's
    query heads. The MLP width splits as evenly as it goes."""
    hq, hk, f = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    per_kv = hq // hk  # query heads a kv head serves
    if hk >= n:
        k0, k1 = rank * hk // n, (rank + 1) * hk // n
        q = (k0 * per_kv, k1 * per_kv)
    elif n % hk == 0 and per_kv % (n // hk) == 0:
        sharing = n // hk  # ranks holding a copy of one kv head
        k0, k1 = rank // sharing, rank // sharing + 1
        share = per_kv // sharing
        q = (k0 * per_kv + rank % sharing * share, k0 * per_kv + (rank % sharing + 1) * share)
    else:
        raise LlmfnError(f"tensor parallel {n}: the model's {hk} kv heads (each serving {per_kv} query heads) "
                         f"do not split over {n} ranks")  # fmt: skip
    if f < n:
        raise LlmfnError(f"tensor parallel {n}: the MLP width {f} is smaller than the number of ranks")
    return HeadSplit(q, (k0, k1), (rank * f // n, (rank + 1) * f // n))


def shard_layer(layer: dict, cfg, split: HeadSplit, group) -> dict:
    """One Llama-layout layer dict -> this rank's shard (see the module doc)."""
    hd, hq, hk, f = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    (q0, q1), (k0, k1), (m0, m1) = split.q, split.kv, split.mlp
    qkv_rows = torch.cat([_arange(q0 * hd, q1 * hd), hq * hd + _arange(k0 * hd, k1 * hd),
                          (hq + hk) * hd + _arange(k0 * hd, k1 * hd)])  # fmt: skip
    mlp_rows = torch.cat([_arange(m0, m1), f + _arange(m0, m1)])
    out = dict(layer)  # norms and the row-parallel biases (added once, after the sum) stay whole
    for name, rows in (("wqkv", qkv_rows), ("bqkv", qkv_rows), ("w_gate_up", mlp_rows), ("b_gate_up", mlp_rows)):
        if name in layer:
            out[name] = take_rows(layer[name], rows)
    out["wo"] = RowParallel(take_columns(layer["wo"], q0 * hd, q1 * hd), group)
    out["w_down"] = RowParallel(take_columns(layer["w_down"], m0, m1), group)
    return out


def shard_vocab(w, rank: int, n: int, group, memo: dict):
    """embed / lm_head -> a VocabShard when n divides the vocabulary, else w itself (replicated).
    `memo` keeps a tied embed / lm_head one leaf."""
    if id(w) in memo:
        return memo[id(w)]
    rows = w.shape[0]
    out = w if rows % n else VocabShard(take_rows(w, _arange(rank * rows // n, (rank + 1) * rows // n)),
                                        rank * rows // n, group)  # fmt: skip
    memo[id(w)] = out
    return out


def shard_tensor(model: Model, group=None, *, vocab: str = "split") -> Model:
    """This rank's tensor-parallel shard of a loaded Llama-layout model over `group` (default: the
    world), as a new Model (the input is left as it was; drop it to free its memory). vocab: "split"
    (embed and lm_head vocab-parallel) or "replicated"."""
    if vocab not in ("split", "replicated"):
        raise LlmfnError(f"vocab must be 'split' or 'replicated', got {vocab!r}")
    if model.kind != "causal-lm" or "layers" not in model.params:
        raise LlmfnError("tensor parallel takes a Llama-layout causal language model")
    group = group or dist.group.WORLD
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    cfg, params = model.cfg, model.params
    split = head_split(cfg, rank, n)
    out = dict(params)
    out["layers"] = [shard_layer(layer, cfg, split, group) for layer in params["layers"]]
    if "alibi_slopes" in params:
        out["alibi_slopes"] = params["alibi_slopes"][split.q[0] : split.q[1]].contiguous()
    if vocab == "split":
        memo: dict = {}
        out["embed"] = shard_vocab(params["embed"], rank, n, group, memo)
        out["lm_head"] = shard_vocab(params["lm_head"], rank, n, group, memo)
    local_cfg = dataclasses.replace(cfg, num_heads=split.q[1] - split.q[0], num_kv_heads=split.kv[1] - split.kv[0],
                                    intermediate_size=split.mlp[1] - split.mlp[0])  # fmt: skip
    return dataclasses.replace(model, cfg=local_cfg, params=out, extra={**model.extra, "tensor_parallel": (rank, n)})


__all__ = ["COMM", "HeadSplit", "RowParallel", "VocabShard", "all_gather_last", "all_reduce", "head_split", "shard_layer", "shard_tensor", "shard_vocab", "take_columns", "take_rows"]  # fmt: skip
