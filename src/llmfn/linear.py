"""The one matmul and the one embedding lookup every model calls.

A weight is a plain tensor [out, in] or a quantized leaf (llmfn.quant) that implements
`linear(x)` and `embedding(ids)`; model code never branches on quantization."""

import torch
import torch.nn.functional as F

from llmfn.kernels import cpu


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b). x: [..., in]; w: [out, in] or a quantized leaf."""
    if isinstance(w, torch.Tensor):
        if w.is_contiguous() and cpu.takes(x, w, *(() if b is None else (b,))):
            return cpu.linear(x, w, b)  # decode-sized fp32 CPU matmuls stream the weight faster
        return F.linear(x, w, b)
    y = w.linear(x)
    return y if b is None else y + b


def embedding(w, ids: torch.Tensor) -> torch.Tensor:
    """Rows of w at ids. w: [vocab, dim] or a quantized leaf."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    return w.embedding(ids)
