"""bf16 weights with fp32 activations on CPU: the leaf type a model loaded with dtype=bfloat16 holds
where its weights [out, in] are (llmfn.loading.params), so its decode streams half the bytes of fp32.

Why this arithmetic: decode is bound by reading the weights, so what halves its time is halving their
bytes, not computing in bf16. The C kernels (csrc/bf16.h) widen each bf16 weight to fp32 exactly and
multiply it into fp32 accumulators against fp32 activations. A bf16 model then computes the fp32
model with bf16-rounded weights, x @ w.float()^T, with no rounding of the activations: more accurate
than torch's bf16 model (which rounds every activation to bf16) and, on the C path, bitwise the same
for every row whatever the batch, like the fp32 kernels. vdpbf16ps (AVX-512 BF16) would need the
activations rounded to bf16 as well; measured against widening in benchmarks/RESULTS.md.

Rows beyond kernels.cpu.MAX_ROWS (prefill) take F.linear with the weights widened per call (the same
products, summed by MKL / oneDNN)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from llmfn.kernels import cpu

KIND = 5  # the fused decoder layer's Lin kind for bf16 weights (csrc/decode.c)


@dataclass(frozen=True, eq=False)
class Bf16Weight:
    """A weight [n, k] stored in bfloat16 (row-major, contiguous, CPU) whose matmuls and embedding
    rows are fp32. `dtype` is the stored dtype; activations and results are always fp32."""

    w: torch.Tensor  # bf16 [n, k]

    @property
    def shape(self) -> torch.Size:
        return self.w.shape

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    def numel(self) -> int:
        return self.w.numel()

    def fused_args(self) -> tuple:
        """(kind, weight, 0, 0, 0, 0) pointers for the fused C decoder layer (kernels/cpu.py)."""
        return (KIND, self.w.data_ptr(), 0, 0, 0, 0)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., k] -> x.float() @ w.float()^T [..., n] in fp32."""
        x = x.float()
        if cpu.takes(x):
            return cpu.bf16_linear(x, self.w)
        return F.linear(x, self.w.float())

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows at ids, widened to fp32: [..., k]."""
        return F.embedding(ids, self.w).float()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.w.to(dtype or torch.float32)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """The weight moved / cast: a Bf16Weight where the C kernels take it, else a plain tensor."""
        return wrap(self.w.to(device=device, dtype=dtype))


def takes(w) -> bool:
    """Whether w is a weight Bf16Weight serves: a 2-D bf16 CPU tensor, when the C kernels build here."""
    ok = isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype == torch.bfloat16 and w.device.type == "cpu"
    return ok and not w.requires_grad and cpu.available()


def wrap(w):
    """w as a Bf16Weight (a contiguous copy where it is not) when `takes(w)`, else w."""
    return Bf16Weight(w.contiguous()) if takes(w) else w


pytree.register_pytree_node(  # a leaf of the params tree that torch.compile traces through, as quant.py's
    Bf16Weight,
    lambda w: ([w.w], None),
    lambda children, _: Bf16Weight(children[0]),
    serialized_type_name="llmfn.kernels.bf16.Bf16Weight",
)
