"""Qwen (1) checkpoints (`QWenLMHeadModel`, model_type "qwen"), mapped onto the Llama forward: a
config reader and a tensor name map, which loading/families.py names for model_type "qwen".

Original (Qwen's modeling_qwen.py)               llmfn (models/llama.py layout)
  transformer.wte                                  embed
  transformer.h.N.ln_1 / ln_2                      attn_norm / mlp_norm
  attn.c_attn (+ bias), q|k|v stacked              wqkv, bqkv
  attn.c_proj                                      wo (bo unless no_bias)
  mlp.w2 (the silu'd gate), mlp.w1 (up)            w_gate_up = [w2; w1]  (c_proj(w1(x) * silu(w2(x))))
  mlp.c_proj                                       w_down
  transformer.ln_f, lm_head                        norm, lm_head
Qwen-1 is multi-head (kv heads = heads, head_dim = kv_channels) and each of w1/w2 is
intermediate_size // 2 wide. `use_dynamic_ntk` / `use_logn_attn` switch on the forward's
dynamic-NTK rope and logn query scaling past `seq_length` (see llama.dynamic_ntk_inv_freq).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmfn.errors import UnsupportedModelError
from llmfn.loading.checkpoint import TensorReader
from llmfn.loading.config import config_fields
from llmfn.models import llama
from llmfn.models.llama import LlamaConfig

# Qwen-1's chat() stops on these besides the generation config's <|endoftext|> (get_stop_words_ids).
CHATML_STOPS = ("<|im_end|>", "<|im_start|>")


def qwen_config(raw: dict, source: Path | str = "config.json") -> LlamaConfig:
    """Map a Qwen-1 config.json (QWenConfig field names) to LlamaConfig."""
    with config_fields(source):
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("kv_channels") or hidden // heads)
        if head_dim * heads != hidden:
            raise UnsupportedModelError(f"{source}: kv_channels * num_attention_heads != hidden_size")
        if float(raw.get("rotary_pct", 1.0)) != 1.0:
            raise UnsupportedModelError(f"{source}: rotary_pct {raw['rotary_pct']} (partial rotary) is not supported")
        seq_length = int(raw.get("seq_length", 2048))
        with_bias = not raw.get("no_bias", True)
        return LlamaConfig(
            model_type="qwen",
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]) // 2,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
            rope_theta=float(raw.get("rotary_emb_base", 10000.0)),
            max_position_embeddings=max(int(raw.get("max_position_embeddings", seq_length)), seq_length),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True,
            o_bias=with_bias,
            mlp_bias=with_bias,
            dynamic_ntk_length=seq_length if raw.get("use_dynamic_ntk") else None,
            logn_length=seq_length if raw.get("use_logn_attn") else None,
        )


def params_from_qwen(tensors: dict[str, torch.Tensor], cfg: LlamaConfig,
                     source: Path | str = "model.safetensors") -> llama.Params:
    """Map QWenLMHeadModel tensor names onto the llmfn layout, checking every shape.

    Consumes `tensors`; anything left over is an error. A quantized checkpoint's linears arrive
    as Pending leaves (llmfn.loading.quantize), which stack (torch.cat) like tensors."""
    reader = TensorReader(tensors, source, prefix="transformer.")
    get, lin = reader.get, reader.linear
    D, F_, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size

    layers = []
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        layer = {
            "attn_norm": get(p + "ln_1.weight", (D,)),
            "wqkv": lin(p + "attn.c_attn", qkv, D),
            "bqkv": get(p + "attn.c_attn.bias", (qkv,)),
            "wo": lin(p + "attn.c_proj", D, cfg.q_size),
            "mlp_norm": get(p + "ln_2.weight", (D,)),
            "w_gate_up": lin((p + "mlp.w2", p + "mlp.w1"), 2 * F_, D),
            "w_down": lin(p + "mlp.c_proj", D, F_),
        }
        if cfg.o_bias:
            layer["bo"] = get(p + "attn.c_proj.bias", (D,))
        if cfg.mlp_bias:
            layer["b_gate_up"] = torch.cat([get(p + "mlp.w2.bias", (F_,)), get(p + "mlp.w1.bias", (F_,))])
            layer["b_down"] = get(p + "mlp.c_proj.bias", (D,))
        layers.append(layer)
    embed = get("wte.weight", (cfg.vocab_size, D))
    norm = get("ln_f.weight", (D,))
    tied = cfg.tie_word_embeddings and not reader.has("lm_head.weight")
    lm_head = embed if tied else get("lm_head.weight", (cfg.vocab_size, D))
    reader.check_all_taken(("rotary_emb", "masked_bias"))
    return {"embed": embed, "norm": norm, "lm_head": lm_head, "rope_inv_freq": llama.rope_inv_freq(cfg), "layers": layers}
