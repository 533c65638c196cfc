"""Quantized leaves at load time: `llmfn.load(..., quantize="int4" | "int8")` rounds a float
checkpoint to nearest tensor by tensor as it is read, and every quantized source (AutoAWQ / llmfn
int8 checkpoints, GGUF blocks, RTN) passes its leaves through a family's name map as `Pending`.

    quantize_tensor(name, w, method)   one HF-named tensor -> a Pending leaf, or w unchanged
    quantize_params(params, method)    a Llama-layout pytree, quantized in memory
    dequantize_params(params)          every quantized leaf back to its dense weight
"""

from __future__ import annotations

import re

import torch

from llmfn.errors import LlmfnError, UnsupportedModelError
from llmfn.kernels.quant import Int4Weight, Int8Weight, cat_out, is_quantized
from llmfn.loading.params import map_leaves

LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")
_LAYER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|lm_head)\.weight$")


def normalize_method(method: str) -> str:
    m = method.lower().removeprefix("rtn-").removeprefix("rtn_")
    if m not in ("int4", "int8"):
        raise LlmfnError(f"unknown quantization {method!r} (int4, int8, rtn-int4 or rtn-int8)")
    return m


class Pending:
    """Stands in for a quantized weight while a family's name map (llmfn.loading.llama.params_from_hf,
    ...) maps names and checks shapes: its torch.cat of q/k/v or gate/up becomes cat_out, so naming
    stays in one place. `unwrap` then puts the leaves in the tree."""

    def __init__(self, leaf):
        self.leaf = leaf
        self.shape = leaf.shape

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat and kwargs.get("dim", args[1] if len(args) > 1 else 0) == 0:
            return Pending(cat_out([a.leaf if isinstance(a, Pending) else a for a in args[0]]))
        raise UnsupportedModelError(f"{func.__name__} is not supported on a quantized weight")


def unwrap(tree):
    """The tree with each Pending replaced by its quantized leaf."""
    return map_leaves(tree, lambda w: w.leaf if isinstance(w, Pending) else w)


def quantize_tensor(name: str, w: torch.Tensor, method: str, group_size: int = 32):
    """One HF-named tensor as load(..., quantize=method) stores it: decoder linears in int4 (group_size,
    when it divides the input dim; int8 per channel otherwise) or int8, the embedding and lm_head in
    per-row int8; anything else unchanged. Quantized results are Pending leaves for the name map."""
    if w.dim() != 2 or not w.is_floating_point():
        return w
    if _LAYER_LINEAR.search(name):
        if method == "int4" and w.shape[1] % group_size == 0:
            return Pending(Int4Weight.quantize(w, group_size))
        return Pending(Int8Weight.quantize(w))
    if _EMBEDDING.search(name):
        return Pending(Int8Weight.quantize(w))
    return w


def quantize_params(params: dict, method: str, group_size: int = 32) -> dict:
    """Quantize a Llama-layout params pytree at load: "int4" puts the layer linears in int4 (RTN,
    group_size) and embed / lm_head in per-row int8; "int8" puts all of them in per-channel int8.
    Leaves that are already quantized are kept. Returns a new pytree."""
    method = normalize_method(method)
    cache: dict[int, object] = {}  # keeps a tied embed / lm_head one leaf

    def q(w, bits):
        if not isinstance(w, torch.Tensor) or id(w) in cache:
            return cache.get(id(w), w)
        if bits == 4 and w.shape[1] % group_size == 0:
            out = Int4Weight.quantize(w, group_size).to(dtype=w.dtype)
        else:
            out = Int8Weight.quantize(w).to(dtype=w.dtype)
        cache[id(w)] = out
        return out

    bits = 4 if method == "int4" else 8
    out = dict(params)
    out["embed"] = q(params["embed"], 8)
    out["lm_head"] = q(params["lm_head"], 8)
    out["layers"] = [{k: (q(v, bits) if k in LINEARS else v) for k, v in layer.items()} for layer in params["layers"]]
    return out


def dequantize_params(tree):
    """The same pytree with every quantized leaf replaced by its dense weight (tied leaves stay tied)."""
    return map_leaves(tree, lambda w: w.dequantize() if is_quantized(w) else w)
