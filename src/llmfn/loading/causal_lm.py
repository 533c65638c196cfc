"""Causal LMs: a checkpoint folder read through its family's layout (config.json reader + tensor name
map onto the Llama forward of models/llama.py) into a Model, with dense or quantized weights.

Every route ends the same way: the name map (quantized sources pass Pending leaves through it),
`finish_params` (one pass: cast, move, decode layout, ties kept), then `causal_lm_model` (tokenizer,
chat template, generation defaults)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmfn.loading.awq import quantized_tensors, read_quantization_config
from llmfn.loading.chat_formats import fallback_template, token_id
from llmfn.loading.checkpoint import iter_tensors, read_tensors, weight_files
from llmfn.loading.config import read_json
from llmfn.loading.params import finish_params
from llmfn.loading.quantize import quantize_tensor, unwrap
from llmfn.model import GenerationDefaults, Model
from llmfn.models.llama import LlamaConfig
from llmfn.tokenizer import load_tokenizer


@dataclass(frozen=True)
class CausalLM:
    """One family's checkpoint layout, run by the Llama forward."""

    config: Callable[[dict, Path | str], LlamaConfig]  # (config.json dict, source) -> LlamaConfig
    params: Callable[..., dict]  # (tensors by HF name, cfg, source) -> params pytree; consumes tensors
    stop_tokens: tuple[str, ...] = ()  # token texts the original chat() also stops on


def read_causal_lm(folder: Path, raw: dict, family: CausalLM, dtype: torch.dtype, device: str,
                   quantize: str | None = None, group_size: int = 32) -> Model:
    """A causal-LM folder: dense, quantized as stored (AutoAWQ GEMM, llmfn int8: `quantization_config`
    in config.json), or rounded to quantize ("int4" | "int8") tensor by tensor as it is read, so the
    float model never sits in memory whole."""
    stored = read_quantization_config(raw, folder / "config.json") if raw.get("quantization_config") else None
    cfg = family.config(raw, folder / "config.json")
    files = weight_files(folder)
    source = files[0] if len(files) == 1 else folder
    if stored is not None:
        tensors = quantized_tensors(read_tensors(files), stored, source)
    elif quantize is not None:
        tensors = {name: quantize_tensor(name, t, quantize, group_size) for name, t in iter_tensors(files)}
    else:
        tensors = read_tensors(files)
    params = unwrap(family.params(tensors, cfg, source))
    return causal_lm_model(folder, raw, cfg, finish_params(params, dtype, device), family.stop_tokens)


def causal_lm_model(folder: Path, raw: dict, cfg, params: dict, stop_tokens: tuple[str, ...] = ()) -> Model:
    """Finished params with the folder's tokenizer, chat template (or a built-in one, chat_formats) and
    generation defaults; stop_tokens that the tokenizer knows join the EOS ids."""
    tokenizer = load_tokenizer(folder)
    tok_cfg_file = folder / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_file) if tok_cfg_file.exists() else {}
    generation = generation_defaults(folder, raw)
    if stop_tokens:
        stops = tuple(i for i in (token_id(tokenizer, s) for s in stop_tokens) if i is not None)
        generation = dataclasses.replace(generation, eos_ids=tuple(dict.fromkeys(generation.eos_ids + stops)))
    return Model(
        kind="causal-lm",
        cfg=cfg,
        params=params,
        tokenizer=tokenizer,
        generation=generation,
        chat_template=chat_template(folder, tok_cfg) or fallback_template(folder, raw, tokenizer),
        path=folder,
    )


def chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """The folder's chat template: chat_template.jinja, or tokenizer_config.json's field."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def generation_defaults(folder: Path, raw_config: dict) -> GenerationDefaults:
    file = folder / "generation_config.json"
    gen = read_json(file) if file.exists() else {}
    eos = gen.get("eos_token_id", raw_config.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    sampling = {}
    if gen.get("do_sample"):  # transformers' defaults for what the file leaves out: temperature 1, top_k 50
        sampling = {"temperature": 1.0, "top_k": 50, **{k: gen[k] for k in ("temperature", "top_p", "top_k")
                                                        if gen.get(k) is not None}}  # fmt: skip
    return GenerationDefaults(eos_ids=eos_ids, repetition_penalty=float(gen.get("repetition_penalty", 1.0)), **sampling)
