"""BERT-family encoders (post-LayerNorm, absolute + token-type embeddings, GELU FFN) as pure functions.

Covers BertModel checkpoints such as all-MiniLM-L6-v2, BGE and E5, with or without a prefix on the
tensor names (`bert.`, `model.`, ...). One entry point:

    forward(params, cfg, tokens[B, T], attention_mask[B, T] | None, token_type_ids[B, T] | None)
        -> hidden[B, T, D]

Params pytree (every Hugging Face layout is converted to it at load; q, k, v are fused):

    {"tok_embed": [V, D], "pos_embed": [P, D], "type_embed": [TV, D],
     "embed_norm": {"w": [D], "b": [D]},
     "layers": [{"wqkv": [3D, D], "bqkv": [3D],          # rows: q, then k, then v
                 "wo": [D, D], "bo": [D], "attn_norm": {"w": [D], "b": [D]},
                 "w_up": [F, D], "b_up": [F], "w_down": [D, F], "b_down": [D],
                 "mlp_norm": {"w": [D], "b": [D]}}, ...]}

`abstract(cfg)` is the same tree with shapes at the leaves; loading checks every tensor against it.
The four matmul weights may be llmfn.kernels.linear.PackedWeight leaves (packed at load for the CPU
GEMM). Checkpoints are read by llmfn.loading.bert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmfn.kernels.linear import attention_block, feed_forward, packed_attention_block


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_positions: int
    type_vocab_size: int
    norm_eps: float
    act: str = "gelu"  # "gelu" (erf), "gelu_tanh" or "relu"
    pad_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def abstract(cfg: BertConfig) -> dict:
    """The params tree with shapes at the leaves."""
    D, Fd = cfg.dim, cfg.ffn_dim

    def norm():
        return {"w": (D,), "b": (D,)}

    layer = {
        "wqkv": (3 * D, D), "bqkv": (3 * D,), "wo": (D, D), "bo": (D,), "attn_norm": norm(),
        "w_up": (Fd, D), "b_up": (Fd,), "w_down": (D, Fd), "b_down": (D,), "mlp_norm": norm(),
    }  # fmt: skip
    return {
        "tok_embed": (cfg.vocab_size, D),
        "pos_embed": (cfg.max_positions, D),
        "type_embed": (cfg.type_vocab_size, D),
        "embed_norm": norm(),
        "layers": [dict(layer) for _ in range(cfg.n_layers)],
    }


# ---------------------------------------------------------------------------------------------- forward


def _norm(x: torch.Tensor, n: dict, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], n["w"], n["b"], eps)


def _norm_args(n: dict, cfg: BertConfig) -> tuple:
    """A LayerNorm as llmfn.kernels.linear's `norm` argument (fused into the matmul before it)."""
    return n["w"], n["b"], cfg.norm_eps


def forward(
    params: dict,
    cfg: BertConfig,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    *,
    skip_padding: bool = False,
) -> torch.Tensor:
    """Last hidden states [B, T, D] of `tokens` [B, T].

    attention_mask [B, T]: 1 for real tokens, 0 for padding (None: no padding). Padded keys are masked
    out, so a row's real positions do not depend on how far it is padded. token_type_ids: None = 0.
    skip_padding (what pooling callers want: llmfn.embed): padding rows are not computed (16% of the rows
    of a batch of 32 short sentences), the layers run on the real tokens packed together where the C
    attention half takes them, else padded with the feed-forward halves on the real rows only; real
    positions keep their bits, padded ones hold unspecified finite values (else they are computed like
    the real ones, as transformers does)."""
    B, T = tokens.shape
    if T > cfg.max_positions:
        raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings {cfg.max_positions}")
    if token_type_ids is None:
        extra = params["pos_embed"][:T] + params["type_embed"][0]  # [T, D]
    else:
        extra = params["pos_embed"][:T] + F.embedding(token_type_ids, params["type_embed"])  # [B, T, D]
    x = _norm(F.embedding(tokens, params["tok_embed"]) + extra, params["embed_norm"], cfg.norm_eps)  # [B, T, D]
    mask = None if attention_mask is None else attention_mask.bool()  # [B, T], True = attend
    real = None if not skip_padding or mask is None or bool(mask.all()) else mask.reshape(-1).nonzero().squeeze(1)
    if real is not None:
        packed = _packed_layers(x.view(B * T, cfg.dim).index_select(0, real), mask, params, cfg)
        if packed is not None:
            return x.new_zeros(B * T, cfg.dim).index_copy_(0, real, packed).view(B, T, cfg.dim)
    for layer in params["layers"]:
        x = attention_block(x, layer["wqkv"], layer["bqkv"], layer["wo"], layer["bo"], cfg.n_heads, mask,
                            norm=_norm_args(layer["attn_norm"], cfg))  # fmt: skip
        x = _feed_forward(x.view(B * T, cfg.dim), layer, cfg, real).view(B, T, cfg.dim)
    return x


def _packed_layers(x: torch.Tensor, mask: torch.Tensor, params: dict, cfg: BertConfig) -> torch.Tensor | None:
    """The layers over the real tokens x [N, D] of a padded batch (mask [B, T]), packed sequence after
    sequence, or None where the C attention half does not take them (decided at the first layer: its
    conditions are the same for every layer)."""
    lengths = mask.sum(dim=1)
    starts = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int64)  # [B + 1]
    for layer in params["layers"]:
        a = packed_attention_block(x, starts, mask.shape[1], layer["wqkv"], layer["bqkv"], layer["wo"], layer["bo"],
                                   cfg.n_heads, norm=_norm_args(layer["attn_norm"], cfg))  # fmt: skip
        if a is None:
            return None
        x = _feed_forward(a, layer, cfg, None)
    return x


def _feed_forward(x: torch.Tensor, layer: dict, cfg: BertConfig, real: torch.Tensor | None) -> torch.Tensor:
    """A layer's feed-forward half on the rows `real` of x [B * T, D] (None: all). It is row by row,
    and the C GEMM's rows do not depend on their neighbours, so the real rows get the bits they would
    get beside the padding; padding rows keep their (finite) attention-half values."""
    def ff(rows: torch.Tensor) -> torch.Tensor:
        return feed_forward(rows, layer["w_up"], layer["b_up"], layer["w_down"], layer["b_down"], act=cfg.act,
                            norm=_norm_args(layer["mlp_norm"], cfg))  # fmt: skip

    if real is None:
        return ff(x)
    return x.index_copy_(0, real, ff(x.index_select(0, real)))


__all__ = ["BertConfig", "abstract", "forward"]
