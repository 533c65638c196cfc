"""Fused ops. Each has a pure-torch reference (the test oracle); CUDA tensors take the Triton kernel
(registered as torch.ops.llmfn.* for torch.compile), fp32 CPU decode steps the C kernels in cpu.py.

Public ops (shapes in comments):
    rms_norm(x, weight, eps)                       x: [..., dim]
    add_rms_norm(x, residual, weight, eps)         -> (normed, x + residual)
    apply_rope(q, k, cos, sin)                     q: [b, s, hq, d], k: [b, s, hk, d], cos/sin: [b, s, d/2]
                                                   (q and k are donated: rotated in place on CUDA)
    attention(q, k, v, q_pos, scale, alibi_slopes, window)
        q: [b, hq, s, d] at positions q_pos [b, s]; k/v: [b, hk, t, d], slot j holds position j
    qkv_attention(qkv, cos, sin, q_scale, positions, k_cache, v_cache, hq, hk, scale, alibi, window)
        rope + KV-cache write + attention from a fused projection qkv [b, t, (hq+2hk)*d] -> [b, t, hq*d]
    batch_invariant_attention(q, k, v, q_pos, scale, alibi_slopes, window)
        attention's result computed so that a row's result does not depend on its batch (the engine's)
    silu_mul(gate_up)                              gate_up: [..., 2f] -> silu(gate) * up [..., f]
    int4_matmul(x, qweight, scales, zeros, group_size)   x: [..., k] -> [..., n]
        int4 layout (qweight uint8 [n, k/2], scales/zeros [n, k/g]): see reference.py;
        pack_int4 / unpack_int4 / quantize_int4 / dequantize_int4 build and read it.
"""

from llmfn.kernels.ops import (
    add_rms_norm,
    apply_rope,
    attention,
    batch_invariant_attention,
    int4_matmul,
    qkv_attention,
    rms_norm,
    silu_mul,
)
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
    "batch_invariant_attention",
    "dequantize_int4",
    "int4_matmul",
    "pack_int4",
    "qkv_attention",
    "quantize_int4",
    "rms_norm",
    "silu_mul",
    "unpack_int4",
]
