"""Baichuan checkpoints (model_type "baichuan"), mapped onto the Llama forward: a config reader and
a tensor name map, which loading/families.py names for model_type "baichuan".

Original (Baichuan's modeling_baichuan.py)        llmfn (models/llama.py layout)
  model.layers.N.self_attn.W_pack, q|k|v stacked   wqkv
  self_attn.o_proj, mlp.gate/up/down_proj          wo, w_gate_up = [gate; up], w_down
  input_layernorm / post_attention_layernorm       attn_norm / mlp_norm
  model.embed_tokens, model.norm, lm_head          embed, norm, lm_head
Two position encodings share these names: the 7B models use RoPE (their configs carry
max_position_embeddings), the 13B models ALiBi (model_max_length only); a config field
"position_encoding": "rope" | "alibi" overrides the guess. ALiBi models get `alibi_slopes` [H]
instead of `rope_inv_freq`, and attention adds slope * (key pos - query pos), which softmax makes
equal to the original's slope * key pos mask.
Baichuan 2's NormHead divides each lm_head row by its L2 norm on the first forward; llmfn does it
once at load. Baichuan 2 is told from Baichuan 1 (plain head) by its 125,696-token vocabulary, as
vLLM does; a config field "norm_head": true | false overrides it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from llmfn.errors import UnsupportedModelError
from llmfn.kernels.reference import alibi_slopes
from llmfn.loading.checkpoint import TensorReader
from llmfn.loading.config import config_fields
from llmfn.models import llama
from llmfn.models.llama import LlamaConfig

BAICHUAN2_VOCAB = 125696


def baichuan_config(raw: dict, source: Path | str = "config.json") -> LlamaConfig:
    """Map a Baichuan config.json (7B: RoPE, 13B: ALiBi) to LlamaConfig."""
    with config_fields(source):
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported")
        encoding = raw.get("position_encoding") or ("rope" if "max_position_embeddings" in raw else "alibi")
        if encoding not in ("rope", "alibi"):
            raise UnsupportedModelError(f"{source}: position_encoding {encoding!r} (rope or alibi)")
        vocab = int(raw["vocab_size"])
        context = raw.get("max_position_embeddings") or raw.get("model_max_length") or 4096
        return LlamaConfig(
            model_type="baichuan",
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            max_position_embeddings=int(context),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            position_encoding=encoding,
            norm_head=bool(raw.get("norm_head", vocab == BAICHUAN2_VOCAB)),
        )


def params_from_baichuan(tensors: dict[str, torch.Tensor], cfg: LlamaConfig,
                         source: Path | str = "model.safetensors") -> llama.Params:
    """Map BaichuanForCausalLM tensor names onto the llmfn layout, checking every shape; the
    lm_head rows are normalised here when cfg.norm_head. Consumes `tensors`; a quantized
    checkpoint's linears arrive as Pending leaves (llmfn.loading.quantize), which stack like tensors."""
    reader = TensorReader(tensors, source, prefix="model.")
    get, lin = reader.get, reader.linear
    D, F_ = cfg.hidden_size, cfg.intermediate_size

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        layers.append({
            "attn_norm": get(p + "input_layernorm.weight", (D,)),
            "wqkv": lin(p + "self_attn.W_pack", 3 * D, D),
            "wo": lin(p + "self_attn.o_proj", D, D),
            "mlp_norm": get(p + "post_attention_layernorm.weight", (D,)),
            "w_gate_up": lin((p + "mlp.gate_proj", p + "mlp.up_proj"), 2 * F_, D),
            "w_down": lin(p + "mlp.down_proj", D, F_),
        })
    embed = get("embed_tokens.weight", (cfg.vocab_size, D))
    norm = get("norm.weight", (D,))
    lm_head = get("lm_head.weight", (cfg.vocab_size, D))
    if cfg.norm_head:  # NormHead, once: rows to unit L2 norm (computed in fp32, then back)
        lm_head = F.normalize(lm_head.float(), dim=-1).to(lm_head.dtype)
    reader.check_all_taken(("rotary_emb", "future_mask"))
    params = {"embed": embed, "norm": norm, "lm_head": lm_head, "layers": layers}
    if cfg.position_encoding == "alibi":
        params["alibi_slopes"] = alibi_slopes(cfg.num_heads)  # [H] fp32
    else:
        params["rope_inv_freq"] = llama.rope_inv_freq(cfg)
    return params
