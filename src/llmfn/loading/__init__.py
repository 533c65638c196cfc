"""`load(path)`: a checkpoint folder, a GGUF file or a known alias, into a `Model`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from llmfn.chat_formats import fallback_template
from llmfn.errors import CheckpointError, LlmfnError, UnsupportedModelError
from llmfn.kernels import cpu as cpu_kernels
from llmfn.loading import llama as hf_llama
from llmfn.loading.checkpoint import read_tensors, weight_files
from llmfn.loading.config import LLAMA_FAMILY, llama_config_from_hf, read_json
from llmfn.loading.registry import ALIASES, converted_path, package_path, publish_folder
from llmfn.model import GenerationDefaults, Model
from llmfn.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# model_type -> loader(folder, raw_config, dtype, device) -> Model, for families outside the
# Llama layout (BERT, Qwen-1, Baichuan 2); each family module registers itself here.
FAMILY_LOADERS: dict[str, Callable[..., Model]] = {}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LlmfnError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load(
    path: str | Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu", compile: bool | None = None,
    quantize: str | None = None,
) -> Model:
    """Load a model: a Hugging Face folder, a .gguf file, or an alias such as "smollm2-135m-instruct".

    dtype defaults to float32 (the fast CPU type here); weights are mmap'd, never unpickled.
    compile: torch.compile the decode step (None: on for models large enough to gain, see compile.py).
    quantize: "int4" | "int8" weight-only linears (llmfn.quant.load_quantized); a GGUF then keeps
    its Q4_0 / Q4_1 / Q8_0 tensors quantized instead of dequantizing them."""
    if quantize is not None:
        from llmfn.quant import load_quantized

        model = load_quantized(path, quantize, parse_dtype(dtype), device)
    else:
        model = _load(path, parse_dtype(dtype), device)
    if compile is not None:
        model.extra["compile"] = compile
    return model


def _load(path: str | Path, dtype: torch.dtype | None, device: str) -> Model:
    folder = resolve(path)
    if (folder / "modules.json").exists() and not (folder / "config.json").exists():
        from llmfn.embed import load_embedding_model  # sentence-transformers layout with 0_Transformer/

        return load_embedding_model(folder, dtype=dtype, device=device)
    raw = read_json(folder / "config.json")
    model_type = raw.get("model_type")
    if model_type in LLAMA_FAMILY:
        return load_causal_lm(folder, raw, dtype or torch.float32, device)
    _register_families()
    if model_type in FAMILY_LOADERS:
        return FAMILY_LOADERS[model_type](folder, raw, dtype or torch.float32, device)
    known = sorted(set(LLAMA_FAMILY) | set(FAMILY_LOADERS))
    raise UnsupportedModelError(f"{folder / 'config.json'}: model_type {model_type!r} is not supported ({', '.join(known)} are)")


def _register_families() -> None:
    """Import the optional family modules so they add themselves to FAMILY_LOADERS."""
    import importlib

    for module in ("llmfn.embed", "llmfn.loading.qwen", "llmfn.loading.baichuan"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def resolve(path: str | Path) -> Path:
    """The checkpoint folder for an alias, a GGUF file (converted once into the cache) or a folder."""
    name = str(path)
    if name in ALIASES:
        source = package_path(ALIASES[name])
        return ensure_converted(source, name) if source.suffix == ".gguf" else source
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        return ensure_converted(p, p.stem.lower())
    if not p.exists():
        raise CheckpointError(f"{p}: no such model folder, GGUF file or alias (aliases: {', '.join(ALIASES)})")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a model folder or a .gguf file")
    return p


def ensure_converted(gguf_file: Path, name: str) -> Path:
    """Convert a GGUF once into LLMFN_HOME; concurrent first uses each write a temp folder and the
    first rename wins."""
    from llmfn.loading.gguf import convert_gguf

    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: file not found")
    stamp = f"{gguf_file.stat().st_size}-{int(gguf_file.stat().st_mtime)}"
    return publish_folder(converted_path(name), stamp, lambda tmp: convert_gguf(gguf_file, tmp))


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
    if gen.get("do_sample"):
        sampling = {k: gen[k] for k in ("temperature", "top_p", "top_k") if gen.get(k) is not None}
    return GenerationDefaults(eos_ids=eos_ids, repetition_penalty=float(gen.get("repetition_penalty", 1.0)), **sampling)


def cast_params(tree, dtype: torch.dtype, device: str):
    """Cast floating tensors of a params pytree (keeping fp32 derived tables such as rope)."""
    if isinstance(tree, dict):
        return {k: (v.to(device) if k in ("rope_inv_freq", "alibi_slopes") else cast_params(v, dtype, device)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [cast_params(v, dtype, device) for v in tree]
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        return tree.to(device=device, dtype=dtype)
    if hasattr(tree, "to"):
        return tree.to(device)
    return tree


def load_causal_lm(folder: Path, raw: dict, dtype: torch.dtype, device: str) -> Model:
    if raw.get("quantization_config"):  # AutoAWQ / llmfn int8: quantized leaves (llmfn.quant)
        from llmfn.quant import load_quantized_causal_lm

        return load_quantized_causal_lm(folder, raw, dtype, device)
    cfg = llama_config_from_hf(raw, folder / "config.json")
    files = weight_files(folder)
    tensors = read_tensors(files)
    params = hf_llama.params_from_hf(tensors, cfg, source=files[0] if len(files) == 1 else folder)
    tied = cfg.tie_word_embeddings and params["lm_head"] is params["embed"]
    params = cast_params(params, dtype, device)
    if tied:  # keep one tensor for both after the cast
        params["lm_head"] = params["embed"]
    return finish_causal_lm(folder, raw, cfg, params)


def decode_layout(tree, column_major: bool, memo: dict | None = None):
    """Copy every 2-D float CPU weight of a params pytree (shape unchanged, [out, in]) into fresh
    memory, in the layout decode's one-row matmuls stream fastest.

    Row-major for llmfn's C kernels (kernels/cpu.py). Column-major for MKL, used when they cannot be
    built: F.linear(x, w) then multiplies x by a contiguous [in, out] matrix, which MKL streams
    ~1.5x faster than row-major when x has one row (measured 10.2 -> 14.9 GB/s over SmolLM2's layer
    shapes, and prefill is no slower). Either way the copy leaves the mmap'd checkpoint for anonymous
    huge-page memory: 0.9 ms/token faster for SmolLM2 on 2 cores. Tensors shared by reference (a
    tied lm_head) stay shared."""
    memo = {} if memo is None else memo
    if isinstance(tree, dict):
        return {k: decode_layout(v, column_major, memo) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode_layout(v, column_major, memo) for v in tree]
    if isinstance(tree, torch.Tensor) and tree.dim() == 2 and tree.is_floating_point() and tree.device.type == "cpu":
        if id(tree) not in memo:
            memo[id(tree)] = tree.t().contiguous().t() if column_major else tree.contiguous().clone()
        return memo[id(tree)]
    return tree


def finish_causal_lm(folder: Path, raw: dict, cfg, params) -> Model:
    """Attach tokenizer, template and generation defaults; shared by every causal-LM loader."""
    params = decode_layout(params, column_major=not cpu_kernels.available())
    tokenizer = load_tokenizer(folder)
    tok_cfg_file = folder / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_file) if tok_cfg_file.exists() else {}
    return Model(
        kind="causal-lm",
        cfg=cfg,
        params=params,
        tokenizer=tokenizer,
        generation=generation_defaults(folder, raw),
        chat_template=chat_template(folder, tok_cfg) or fallback_template(folder, raw, tokenizer),
        path=folder,
    )
