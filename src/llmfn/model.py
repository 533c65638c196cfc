"""`Model`: plain data that bundles a config, a parameter pytree and a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmfn.sampling import SamplingParams, sampling_params
from llmfn.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's own defaults: generation_config.json's, or for a built-in alias the settings its model
    card recommends (llmfn.loading.registry). Requests override them field by field."""

    eos_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def sampling(self, **given) -> SamplingParams:
        """A request's SamplingParams: the values it gives (None: not given), else these defaults, else
        llmfn.sampling's; checked against KNOBS (RequestError naming the field)."""
        own = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
               "repetition_penalty": self.repetition_penalty}  # fmt: skip
        return sampling_params(**{**own, **{k: v for k, v in given.items() if v is not None}})


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
