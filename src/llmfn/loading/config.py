"""Frozen, hashable configs read from a checkpoint's config.json.

Non-tensor facts (sizes, flags) live here, outside the params pytree, so a config can key
caches and compiled graphs."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from llmfn.errors import CheckpointError, UnsupportedModelError
from llmfn.models.llama import LlamaConfig, RopeScaling

# Families that share the Llama forward after their weights are mapped to its layout.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


@contextmanager
def config_fields(source: Path | str):
    """Reading a config's fields: a missing one or a bad value is a CheckpointError naming the file."""
    try:
        yield
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: bad value ({e})") from None


# Above every released model's context (the longest, 10M tokens): a larger one is a broken config
# that would load and then fail allocating its cache.
MAX_POSITIONS = 1 << 24


def check_sizes(source: Path | str, cfg: LlamaConfig) -> LlamaConfig:
    """A CheckpointError naming the field for a size no model can have: not positive, or (for the
    context) over MAX_POSITIONS."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_position_embeddings"):  # fmt: skip
        value = getattr(cfg, name)
        if value < 1 or (name == "max_position_embeddings" and value > MAX_POSITIONS):
            field = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                     "num_kv_heads": "num_key_value_heads"}.get(name, name)  # fmt: skip
            bound = f"in [1, {MAX_POSITIONS}]" if name == "max_position_embeddings" else "at least 1"
            raise CheckpointError(f"{source}: {field} is {value}; it must be {bound}")
    return cfg


def read_json(path: Path) -> dict:
    """Read a JSON file, raising CheckpointError that names it when missing or malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _rope(raw: dict) -> tuple[float, RopeScaling]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")
    fields = {k: merged[k] for k in ("factor", "low_freq_factor", "high_freq_factor") if k in merged}
    if "original_max_position_embeddings" in merged:
        fields["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return theta, RopeScaling(kind=kind, **{k: (float(v) if k != "original_max_position_embeddings" else v) for k, v in fields.items()})


def llama_config_from_hf(raw: dict, source: Path | str = "config.json") -> LlamaConfig:
    """Map an HF config dict of the Llama family (llama, mistral, qwen2) to LlamaConfig."""
    model_type = raw.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise UnsupportedModelError(f"{source}: model_type {model_type!r} is not a Llama-family model")
    with config_fields(source):
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        theta, scaling = _rope(raw)
        window = None
        if model_type == "mistral" or raw.get("use_sliding_window"):
            window = raw.get("sliding_window")
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported")
        attention_bias = bool(raw.get("attention_bias", False))
        return check_sizes(source, LlamaConfig(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
        ))
