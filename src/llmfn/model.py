"""`Model`: plain data that bundles a config, a parameter pytree and a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmfn.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults from generation_config.json; requests override them."""

    eos_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class Model:
    """kind: "causal-lm" or "embedding". Functions over models live in modules, not here."""

    kind: str
    cfg: Any
    params: dict
    tokenizer: Tokenizer
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    chat_template: str | None = None
    path: Path | None = None
    extra: dict = field(default_factory=dict)  # family-specific data, e.g. embedding pooling
