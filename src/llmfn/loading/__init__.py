"""`load(path)`: a checkpoint folder, a GGUF file or a known alias, into a `Model`.

    families.py        model_type -> how its checkpoint is read (the one table of families)
    causal_lm.py       causal-LM folders through a family layout: dense, AWQ / int8, or rounded at load
    llama.py, qwen.py, baichuan.py   config readers and tensor name maps onto the Llama forward
    bert.py, sentence_transformers.py   BERT encoders and sentence-transformers folders
    gguf.py            GGUF files: one tensor reader, one cache folder per converted model
    awq.py, quantize.py, convert.py   quantized checkpoints, quantize= at load, `llmfn convert`
    params.py          the one pass over a params tree: cast, move, decode layout, ties kept
    checkpoint.py, config.py, registry.py, chat_formats.py   safetensors, config.json, aliases and
                       the cache, built-in chat templates
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llmfn.errors import CheckpointError, LlmfnError
from llmfn.loading.families import FAMILIES, read_folder
from llmfn.loading.params import decode_layout, finish_params, release_freed_memory
from llmfn.loading.quantize import normalize_method
from llmfn.loading.registry import ALIASES, package_path
from llmfn.loading.sentence_transformers import load_embedding_model
from llmfn.model import Model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LlmfnError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load(
    path: str | Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu", compile: bool | None = None,
    quantize: str | None = "auto",
) -> Model:
    """Load a model: a Hugging Face folder, a .gguf file, or an alias such as "smollm2-135m-instruct".

    dtype defaults to float32 (the fast CPU type here); weights are mmap'd, never unpickled.
    compile: torch.compile the decode step (None: off on CPU, where it does not pay; on on CUDA for
    models of 50M+ parameters, see backend.py).
    quantize: "auto" (the default) runs a GGUF on its own Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q5_0 blocks, as llama.cpp
    does, unless a dtype is given (a dtype asks for dense weights in it), and loads anything else as
    stored (an AWQ / int8 checkpoint stays quantized, a float one stays float); None or "none"
    dequantizes a GGUF to dense weights; "int4" | "int8" weight-only linears (llmfn.kernels.quant
    leaves): a float checkpoint is rounded as it is read, an AWQ / int8 checkpoint loads as stored,
    and a GGUF keeps its Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q5_0 blocks ("int8": Q8_0 only, the rest rounded)."""
    torch_dtype = parse_dtype(dtype)
    method = effective_quantize(path, dtype, quantize)
    gguf = gguf_source(path) if method is not None else None
    if gguf is not None:
        from llmfn.loading.gguf import load_gguf

        model = load_gguf(*gguf, torch_dtype or torch.float32, device, method)
    else:
        model = read_folder(resolve(path), torch_dtype, device, method)
    if compile is not None:
        model.extra["compile"] = compile
    alias = ALIASES.get(str(path))
    if alias is not None and alias.sampling:
        model.generation = dataclasses.replace(model.generation, **dict(alias.sampling))
    release_freed_memory()
    return model


QUANTIZE_CHOICES = ("auto", "none", "int4", "int8")


def effective_quantize(path: str | Path, dtype: str | torch.dtype | None, quantize: str | None) -> str | None:
    """What load(path, dtype=, quantize=) does to the weights: "int4" | "int8" quantized linears
    (for a GGUF, "int4" keeps every Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q5_0 block as it is), or None for the weights
    as stored, GGUF blocks dequantized. "auto" is "int4" for a GGUF loaded without a dtype."""
    if quantize is None or quantize == "none":
        return None
    if quantize == "auto":
        return "int4" if dtype is None and gguf_source(path) is not None else None
    return normalize_method(quantize)


def gguf_source(path: str | Path) -> tuple[Path, str] | None:
    """(GGUF file, cache name) for a .gguf path or an alias of a GGUF; None for anything else."""
    name = str(path)
    if name in ALIASES:
        source = package_path(ALIASES[name])
        return (source, name) if source.suffix == ".gguf" else None
    p = Path(path).expanduser()
    return (p, p.stem.lower()) if p.suffix == ".gguf" else None


def resolve(path: str | Path) -> Path:
    """The checkpoint folder for an alias, a GGUF file (converted once into the cache) or a folder."""
    gguf = gguf_source(path)
    if gguf is not None:
        from llmfn.loading.gguf import converted_folder

        return converted_folder(*gguf)
    name = str(path)
    if name in ALIASES:
        return package_path(ALIASES[name])
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such model folder, GGUF file or alias (aliases: {', '.join(ALIASES)})")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a model folder or a .gguf file")
    return p


__all__ = ["DTYPES", "FAMILIES", "QUANTIZE_CHOICES", "decode_layout", "effective_quantize", "finish_params",
           "gguf_source", "load", "load_embedding_model", "parse_dtype", "resolve"]
