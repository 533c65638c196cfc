"""GGUF import: read a llama.cpp GGUF file with the `gguf` package and write a Hugging Face-style
folder (config.json, model.safetensors, tokenizer files, generation_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from llmfn.errors import CheckpointError, UnsupportedModelError

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
SUPPORTED_ARCHS = ("llama", "qwen2")


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over path, with llmfn errors for missing or corrupt files."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, source: Path | str = "model.gguf") -> dict:
    """An HF config.json dict for a llama or qwen2 GGUF."""
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{source}: GGUF architecture {arch!r} is not supported ({', '.join(SUPPORTED_ARCHS)} are)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(f"{source}: GGUF rope_freqs (llama3 rope scaling) is not supported yet")

    def m(key, default=None):
        return metadata(reader, f"{arch}.{key}", default)

    heads = int(m("attention.head_count"))
    hidden = int(m("embedding_length"))
    vocab = m("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m("attention.head_count_kv", heads)),
        "head_dim": int(m("attention.key_length") or m("rope.dimension_count") or hidden // heads),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(m("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata(reader, "tokenizer.ggml.eos_token_id"),
    }


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> half-split rope)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized_tensors(reader, config: dict, dtype: torch.dtype = torch.float32, progress=None) -> dict[str, torch.Tensor]:
    """All tensors of a GGUF under HF names, dequantized with the `gguf` package.
    progress(done, total, name), if given, is called after each tensor."""
    from gguf.quants import dequantize

    out = {}
    for done, t in enumerate(reader.tensors, 1):
        name, heads = hf_name(t.name), permuted_heads(config, t.name)
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # writable copy
        if heads is not None:
            w = _unpermute(w, heads)
        out[name] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
        if progress is not None:
            progress(done, len(reader.tensors), t.name)
    return out


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    elif gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")


def permuted_heads(config: dict, gguf_name: str) -> int | None:
    """The head count whose rows llama.cpp permuted in this tensor (q and k of llama GGUFs), or None."""
    if config["model_type"] != "llama" or not gguf_name.startswith("blk."):
        return None
    kind = gguf_name.split(".")[2]
    return {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(kind)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32, progress=None) -> Path:
    """Write a Hugging Face-style folder for gguf_path into out_dir and return out_dir.
    progress(done, total, name), if given, reports each tensor as it is dequantized."""
    from llmfn.gguf_tokenizer import tokenizer_files_from_gguf

    reader = open_gguf(gguf_path)
    config = config_from_gguf(reader, gguf_path)
    tokenizer_files = tokenizer_files_from_gguf(reader)
    tensors = dequantized_tensors(reader, config, dtype, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for name, text in tokenizer_files.items():
        (out / name).write_text(text, encoding="utf-8")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file(tensors, str(out / "model.safetensors.partial"), metadata={"format": "pt", "source": Path(gguf_path).name})
    (out / "model.safetensors.partial").replace(out / "model.safetensors")
    # config.json last: its presence marks a complete conversion.
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
