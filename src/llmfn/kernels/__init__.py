"""Fused ops. Each has a pure-torch reference (the CPU path and the test oracle);
CUDA tensors take the Triton kernel where one exists.

Public ops (shapes in comments):
    rms_norm(x, weight, eps)                       x: [..., dim]
    add_rms_norm(x, residual, weight, eps)         -> (normed, x + residual)
    apply_rope(q, k, cos, sin)                     q: [b, s, hq, d], k: [b, s, hk, d], cos/sin: [b, s, d/2]
    attention(q, k, v, q_pos, scale, alibi_slopes, window)
        q: [b, hq, s, d] at positions q_pos [b, s]; k/v: [b, hk, t, d], slot j holds position j
"""

from llmfn.kernels.ops import add_rms_norm, apply_rope, attention, rms_norm

__all__ = ["add_rms_norm", "apply_rope", "attention", "rms_norm"]
