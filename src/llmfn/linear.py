"""The one matmul and the one embedding lookup every model calls.

A weight is a plain tensor [out, in] or a quantized leaf (llmfn.quant) that implements
`linear(x)` and `embedding(ids)`; model code never branches on quantization.

fp32 CPU matmuls take the fastest path measured on this project's 2-core AVX2 machine: llmfn's C
kernel up to kernels.cpu.MAX_ROWS rows (decode: it streams the weight at ~27 GB/s, MKL ~18), and
oneDNN's linear above that (prefill: 8% faster than MKL's sgemm end to end, SmolLM2's 128-token
prompt 459 -> 495 tok/s; a row's result does not depend on its batch, as the engine needs)."""

import torch
import torch.nn.functional as F

from llmfn.kernels import cpu

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b). x: [..., in]; w: [out, in] or a quantized leaf."""
    if isinstance(w, torch.Tensor):
        operands = (w,) if b is None else (w, b)
        if w.is_contiguous() and cpu.takes(x, *operands):
            return cpu.linear(x, w, b)
        if _ONEDNN and w.is_contiguous() and cpu.fp32_cpu(x, *operands) and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)
    y = w.linear(x)
    return y if b is None else y + b


def embedding(w, ids: torch.Tensor) -> torch.Tensor:
    """Rows of w at ids. w: [vocab, dim] or a quantized leaf."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    return w.embedding(ids)
