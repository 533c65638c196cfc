"""Every model family llmfn reads, by config.json's model_type, in one table: FAMILIES.

A causal LM is a layout run by the Llama forward (models/llama.py): a config.json reader and a
tensor name map (CausalLM); an embedding model is read by its folder reader (Encoder). Adding a
family is one line here; importing a module registers nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmfn.errors import UnsupportedModelError
from llmfn.loading import baichuan, qwen
from llmfn.loading.causal_lm import CausalLM, read_causal_lm
from llmfn.loading.config import LLAMA_FAMILY, llama_config_from_hf, read_json
from llmfn.loading.llama import params_from_hf
from llmfn.loading.sentence_transformers import load_embedding_model
from llmfn.model import Model


@dataclass(frozen=True)
class Encoder:
    """An embedding model family: read(folder, dtype=, device=) -> Model(kind="embedding")."""

    read: Callable[..., Model]


LLAMA = CausalLM(llama_config_from_hf, params_from_hf)

FAMILIES: dict[str, CausalLM | Encoder] = {
    "llama": LLAMA,  # Llama 2 / 3, SmolLM (LlamaForCausalLM names)
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen": CausalLM(qwen.qwen_config, qwen.params_from_qwen, stop_tokens=qwen.CHATML_STOPS),  # Qwen-1
    "baichuan": CausalLM(baichuan.baichuan_config, baichuan.params_from_baichuan),  # Baichuan 1 / 2
    "bert": Encoder(load_embedding_model),  # BertModel, sentence-transformers
}


def read_folder(folder: Path, dtype: torch.dtype | None, device: str, quantize: str | None = None) -> Model:
    """A checkpoint folder into a Model, by its config.json's model_type. quantize ("int4" | "int8",
    normalized) rounds a float Llama-family checkpoint as it is read."""
    if quantize is None and (folder / "modules.json").exists() and not (folder / "config.json").exists():
        return load_embedding_model(folder, dtype=dtype, device=device)  # sentence-transformers, 0_Transformer/
    raw = read_json(folder / "config.json")
    model_type = raw.get("model_type")
    if quantize is not None and model_type not in LLAMA_FAMILY:
        raise UnsupportedModelError(f"{folder}: quantize= supports Llama-family causal LMs ({', '.join(LLAMA_FAMILY)})")
    family = FAMILIES.get(model_type)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(f"{folder / 'config.json'}: model_type {model_type!r} is not supported ({known} are)")
    if isinstance(family, Encoder):
        return family.read(folder, dtype=dtype or torch.float32, device=device)
    return read_causal_lm(folder, raw, family, dtype or torch.float32, device, quantize)
