"""Hugging Face LlamaForCausalLM-style checkpoints (Llama 2/3, Mistral, Qwen2, SmolLM) onto the
llmfn params layout of models/llama.py."""

from __future__ import annotations

import torch

from llmfn.loading.checkpoint import TensorReader
from llmfn.models.llama import LlamaConfig, Params, rope_inv_freq


def params_from_hf(tensors: dict[str, torch.Tensor], cfg: LlamaConfig, source="model.safetensors") -> Params:
    """Map HF LlamaForCausalLM-style tensor names onto the llmfn layout, checking every shape.

    Consumes `tensors`; anything left over that is not a known buffer is an error."""
    D, F_ = cfg.hidden_size, cfg.intermediate_size
    reader = TensorReader(tensors, source, prefix="model.")
    get = reader.get

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        q = get(p + "self_attn.q_proj.weight", (cfg.q_size, D))
        k = get(p + "self_attn.k_proj.weight", (cfg.kv_size, D))
        v = get(p + "self_attn.v_proj.weight", (cfg.kv_size, D))
        layer = {
            "attn_norm": get(p + "input_layernorm.weight", (D,)),
            "wqkv": torch.cat([q, k, v]),
            "wo": get(p + "self_attn.o_proj.weight", (D, cfg.q_size)),
            "mlp_norm": get(p + "post_attention_layernorm.weight", (D,)),
            "w_gate_up": torch.cat(
                [get(p + "mlp.gate_proj.weight", (F_, D)), get(p + "mlp.up_proj.weight", (F_, D))]
            ),
            "w_down": get(p + "mlp.down_proj.weight", (D, F_)),
        }
        if cfg.qkv_bias:
            layer["bqkv"] = torch.cat(
                [
                    get(p + "self_attn.q_proj.bias", (cfg.q_size,)),
                    get(p + "self_attn.k_proj.bias", (cfg.kv_size,)),
                    get(p + "self_attn.v_proj.bias", (cfg.kv_size,)),
                ]
            )
        if cfg.o_bias:
            layer["bo"] = get(p + "self_attn.o_proj.bias", (D,))
        if cfg.mlp_bias:
            layer["b_gate_up"] = torch.cat([get(p + "mlp.gate_proj.bias", (F_,)), get(p + "mlp.up_proj.bias", (F_,))])
            layer["b_down"] = get(p + "mlp.down_proj.bias", (D,))
        layers.append(layer)
    embed = get("embed_tokens.weight", (cfg.vocab_size, D))
    norm = get("norm.weight", (D,))
    head_name = "lm_head.weight"
    if cfg.tie_word_embeddings and not reader.has(head_name):
        lm_head = embed
    else:
        lm_head = get(head_name, (cfg.vocab_size, D))
    reader.check_all_taken()
    return {"embed": embed, "norm": norm, "lm_head": lm_head, "rope_inv_freq": rope_inv_freq(cfg), "layers": layers}
