"""Fused ops. Each has a pure-torch reference (the CPU path and the test oracle);
CUDA tensors take the Triton kernel (registered as torch.ops.llmfn.* for torch.compile).

Public ops (shapes in comments):
    rms_norm(x, weight, eps)                       x: [..., dim]
    add_rms_norm(x, residual, weight, eps)         -> (normed, x + residual)
    apply_rope(q, k, cos, sin)                     q: [b, s, hq, d], k: [b, s, hk, d], cos/sin: [b, s, d/2]
                                                   (q and k are donated: rotated in place on CUDA)
    attention(q, k, v, q_pos, scale, alibi_slopes, window)
        q: [b, hq, s, d] at positions q_pos [b, s]; k/v: [b, hk, t, d], slot j holds position j
    int4_matmul(x, qweight, scales, zeros, group_size)   x: [..., k] -> [..., n]
        int4 layout (qweight uint8 [n, k/2], scales/zeros [n, k/g]): see reference.py;
        pack_int4 / unpack_int4 / quantize_int4 / dequantize_int4 build and read it.
"""

from llmfn.kernels.ops import add_rms_norm, apply_rope, attention, int4_matmul, rms_norm
from llmfn.kernels.reference import (
    KernelError,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

__all__ = [
    "KernelError",
    "add_rms_norm",
    "apply_rope",
    "attention",
    "dequantize_int4",
    "int4_matmul",
    "pack_int4",
    "quantize_int4",
    "rms_norm",
    "unpack_int4",
]
