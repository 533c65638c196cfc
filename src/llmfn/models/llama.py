"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) as a pure function over a params pytree.

    logits, cache = forward(params, cfg, tokens, positions, cache)

Params layout (every Llama-family checkpoint is mapped onto it at load):
    embed [V, D]; norm [D]; lm_head [V, D] (the embed tensor itself when tied);
    rope_inv_freq [hd/2] (fp32, derived from cfg); alibi_slopes [Hq] instead for ALiBi models;
    layers: list of {attn_norm [D], wqkv [(Hq+2Hk)*hd, D], bqkv? [(Hq+2Hk)*hd], wo [D, Hq*hd], bo? [D],
                     mlp_norm [D], w_gate_up [2F, D], b_gate_up? [2F], w_down [D, F], b_down? [D]}
KV cache: `KVCache(k, v, blocks)`: k, v each [L, N, Hk, S, hd], N blocks of S slots. Without a block
table (blocks None, what `init_cache` makes) block b is row b's cache: slot j holds position j. With
blocks [B, nb] (int32), row b's position p is in block blocks[b, p // S], slot p % S: a paged cache,
whose rows hold only the blocks their tokens fill (the engine's pool, llmfn/engine/blocks.py).
The cache is donated: forward writes the new keys and values into it in place and returns it.
Qwen-1 and Baichuan checkpoints map onto the same layout (loading/qwen.py, loading/baichuan.py);
Qwen-1's dynamic-NTK rope and logn query scaling are cfg flags that are off for every other family.

This file is the readable reference: it never asks which device, dtype or backend it runs on.
A backend that has a faster equal layer stack passes it as `forward(..., layers=)` (llmfn.backend
gives the fused C decode step on CPU); ops inside go through llmfn.kernels, which picks Triton, C or
torch per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from llmfn import kernels
from llmfn.kernels.linear import embedding, linear

Params = dict


class KVCache(NamedTuple):
    """Keys and values of every layer, k and v each [L, N, Hk, S, hd]: N blocks of S slots. blocks
    [B, nb] int32 maps row b's position p to block blocks[b, p // S], slot p % S; None: block b is row
    b's whole cache (N == B, slot j holds position j). k and v may be narrower than the activations
    (a bf16 / fp16 cache of an fp32 model): keys and values are stored rounded and read widened."""

    k: torch.Tensor
    v: torch.Tensor
    blocks: torch.Tensor | None = None

    def view(self, rows: slice = slice(None), slots: int | None = None) -> KVCache:
        """The given rows and first `slots` slots of a cache without a block table, sharing memory."""
        assert self.blocks is None, "a paged cache is viewed through its block table"
        return KVCache(*(t[:, rows, :, :slots] for t in (self.k, self.v)))


class RopeTables(NamedTuple):
    """Per-step position tables: cos, sin [B, T, hd/2] (None for ALiBi models) and Qwen-1's logn
    query scale [B, T, 1, 1] (None elsewhere)."""

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    q_scale: torch.Tensor | None


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling as in HF `rope_parameters` / `rope_scaling`; kind: default, linear, llama3."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # Baichuan-2 13B / Qwen-1 style variants (filled by their loaders).
    position_encoding: str = "rope"  # "rope" or "alibi"
    norm_head: bool = False  # lm_head rows were unit-normalised at load (Baichuan 2)
    # Qwen-1 long context, off (None) elsewhere: past this trained length the rope base grows with
    # the row's length (dynamic NTK), and queries are scaled by log(pos + 1) / log(length) (logn).
    dynamic_ntk_length: int | None = None
    logn_length: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies [hd/2] with linear or llama3 scaling, as HF computes them."""
    return scaled_inv_freq(base_inv_freq(cfg.rope_theta, cfg.head_dim), cfg.rope_scaling)


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Unscaled rotary inverse frequencies [dim/2], in fp32 as HF computes them."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def scaled_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """inv_freq under rope scaling s (HF's linear and llama3 rules, in fp32 as HF runs them)."""
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def dynamic_ntk_inv_freq(cfg: LlamaConfig, positions: torch.Tensor) -> torch.Tensor:
    """Qwen-1's dynamic NTK rope, per row: inverse frequencies [B, 1, hd/2].

    Qwen-1 (modeling_qwen.py, get_ntk_alpha / RotaryEmbedding) takes the sequence length L seen by
    a forward, alpha = max(2 ** ceil(log2(L / seq_length) + 1) - 1, 1), and rebuilds the rotary base
    as base * alpha ** (hd / (hd - 2)). Kept pure: L is each row's largest position + 1, computed
    in-graph from the positions tensor (no host sync, no state), so a whole-prompt prefill matches
    the original exactly. The original then keeps its prefill alpha for the decode steps that follow;
    here a step past a doubling of seq_length uses the alpha of its own length (as HF's dynamic-NTK
    Llama does), and a prompt prefilled in chunks gets each chunk's alpha. Within seq_length alpha is 1."""
    hd = cfg.head_dim
    length = positions.amax(dim=-1).float() + 1  # [B]
    alpha = (2.0 ** (torch.ceil(torch.log2(length / cfg.dynamic_ntk_length)) + 1) - 1).clamp(min=1.0)  # [B]
    base = cfg.rope_theta * alpha ** (hd / (hd - 2))  # [B]
    exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=positions.device).float() / hd  # [hd/2]
    return 1.0 / (base[:, None, None] ** exponent)  # [B, 1, hd/2]


def logn_scale(cfg: LlamaConfig, positions: torch.Tensor) -> torch.Tensor:
    """Qwen-1's logn attention: the query at position p is scaled by log(p + 1) / log(seq_length)
    when p + 1 > seq_length, else 1 (modeling_qwen.py's logn_tensor). [B, T] -> [B, T, 1, 1]."""
    n = positions.float() + 1  # [B, T]
    scale = torch.where(n > cfg.logn_length, n.log() / math.log(cfg.logn_length), torch.ones_like(n))
    return scale[..., None, None]


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=torch.float32, device="cpu") -> KVCache:
    """A zeroed KV cache for `batch` rows of `length` positions each (or a pool of `batch` blocks of
    `length` slots, to read through a block table)."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


def kv_bytes_per_token(cfg: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes of KV cache one position takes over all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def rope_tables(params: Params, cfg: LlamaConfig, positions: torch.Tensor) -> RopeTables:
    """cos / sin of every position's rotation (none for ALiBi models) and the logn query scale."""
    cos = sin = None
    if "rope_inv_freq" in params:
        inv_freq = params["rope_inv_freq"]  # [hd/2]
        if cfg.dynamic_ntk_length:
            inv_freq = dynamic_ntk_inv_freq(cfg, positions)  # [B, 1, hd/2]
        freqs = positions[..., None].float() * inv_freq  # [B, T, hd/2]
        cos, sin = freqs.cos(), freqs.sin()
    return RopeTables(cos, sin, logn_scale(cfg, positions) if cfg.logn_length else None)


def _attention(x, layer, params, cfg: LlamaConfig, rope: RopeTables, positions, k_cache, v_cache, blocks,
               attention):
    qkv = linear(x, layer["wqkv"], layer.get("bqkv"))  # [b, t, (Hq+2Hk)*hd]
    out = kernels.qkv_attention(
        qkv, rope.cos, rope.sin, rope.q_scale, positions, k_cache, v_cache, cfg.num_heads, cfg.num_kv_heads,
        1.0 / math.sqrt(cfg.head_dim), params.get("alibi_slopes"), cfg.sliding_window, attention, blocks,
    )  # [b, t, Hq*hd]; the caches are written in place
    return linear(out, layer["wo"], layer.get("bo"))


def _mlp(x, layer):
    gate_up = linear(x, layer["w_gate_up"], layer.get("b_gate_up"))  # [b, t, 2F]
    return linear(kernels.silu_mul(gate_up), layer["w_down"], layer.get("b_down"))


def decoder_layers(params: Params, cfg: LlamaConfig, x: torch.Tensor, rope: RopeTables, positions: torch.Tensor,
                   cache: KVCache, attention=None) -> torch.Tensor:
    """The pre-norm layer stack over the residual stream x [B, T, D] -> [B, T, D]; writes the cache."""
    for i, layer in enumerate(params["layers"]):
        h = kernels.rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        x = x + _attention(h, layer, params, cfg, rope, positions, cache.k[i], cache.v[i], cache.blocks, attention)
        h = kernels.rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
        x = x + _mlp(h, layer)
    return x


def forward(
    params: Params,
    cfg: LlamaConfig,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    logit_index: torch.Tensor | None = None,
    attention=None,
    layers=decoder_layers,
    whole=None,
) -> tuple[torch.Tensor, KVCache]:
    """tokens, positions: [B, T] (int64). Returns fp32 logits [B, T, V] and the (donated) cache.

    With logit_index [B] (an index into T per row), only those rows' logits are computed: [B, 1, V].
    attention: an op with kernels.attention's signature to use instead of it (the engine passes a
    batch-invariant one for its decode steps). layers: `decoder_layers` or a function that computes
    the same (same arguments, same result), how a backend substitutes a fused implementation; whole:
    likewise for the whole step, whole(params, cfg, tokens, positions, cache, attention) -> the logits
    this function computes, or None where it cannot (asked only without a logit_index)."""
    if whole is not None and logit_index is None:
        logits = whole(params, cfg, tokens, positions, cache, attention)
        if logits is not None:
            return logits, cache
    x = embedding(params["embed"], tokens)  # [B, T, D]
    x = layers(params, cfg, x, rope_tables(params, cfg, positions), positions, cache, attention)
    if logit_index is not None:
        x = x[torch.arange(x.shape[0], device=x.device), logit_index][:, None]  # [B, 1, D]
    x = kernels.rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return linear(x, params["lm_head"]).float(), cache
