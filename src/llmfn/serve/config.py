"""Server configuration: a TOML file decoded into msgspec Structs, or the embedded defaults.

    api_keys = ["sk-local-1"]            # optional; LLMFN_API_KEYS (comma-separated) adds more
    cors_origins = ["http://localhost:3000"]   # or ["*"]; empty: no CORS headers

    [limits]
    max_running = 16         # requests decoded together per model
    max_queued = 64          # waiting beyond that; more gets 429
    kv_cache_memory = "512MiB"   # KV cache per model: bytes, or KiB / MiB / GiB (default: a tenth of
                                 # the machine's memory, at most 1 GiB; pages in no use stay untouched)
    kv_cache_dtype = "float16"   # KV cache of fp32 models in float16 / bfloat16: twice the positions in
                                 # that memory, keys and values rounded once (default: the model's dtype)
    max_tokens = 4096        # cap on max_tokens (and the default when a request gives none)
    max_body_bytes = 4194304 # larger request bodies get 413
    request_timeout = 30.0   # seconds to read a request's headers and its body; then 408 and closed
    shutdown_timeout = 10.0  # on SIGTERM, seconds requests under way may run on; then they are ended
    sse_keepalive = 15.0     # seconds of silence in a stream (e.g. queued for a slot) before a comment

    [access_log]             # one line per request on stderr (`llmfn serve --no-access-log` turns it off)
    enabled = true
    format = "text"          # or "json": one JSON object per line

    [[models]]
    name = "smollm2"                  # the `model` clients send
    path = "smollm2-135m-instruct"    # a folder, a .gguf file or a known alias
    aliases = ["gpt-4o-mini"]         # more names for the same model
    dtype = "float32"                 # optional: weights in this dtype (a GGUF is then dequantized)
    quantize = "auto"                 # optional: "auto" (a GGUF runs on its Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K / Q5_0 blocks),
                                      # "none" (dequantize), "int4" or "int8" (weight-only, rounded at load)
    device = "cpu"                    # optional
    type = "causal-lm"                # optional: "causal-lm" or "embedding" (else from config.json)
    compile = true                    # optional: torch.compile the decode step (default: off on CPU,
                                      # where it does not pay; on on CUDA for models of 50M+ parameters)
    max_model_len = 2048              # optional: tokens per request (prompt + completion), below the model's
                                      # context (default: the context, capped by what the KV cache holds);
                                      # context_length is the older name of the same setting
    speculative = "ngram"             # optional: prompt-lookup speculative decoding; the output is the
                                      # same token for token, faster on text that copies its input

Every mistake is a `LlmfnError` with one line naming the file and the field at fault.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from llmfn.errors import LlmfnError

API_KEYS_ENV = "LLMFN_API_KEYS"  # comma-separated bearer keys, added to the file's api_keys
CONFIG_ENV = "LLMFN_SERVE_CONFIG"  # JSON of a ServerConfig, how `run` hands it to Granian's workers
CONFIG_FILE_ENV = "LLMFN_SERVE_CONFIG_FILE"  # or a TOML path, for `granian --factory` by hand

DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
ModelType = Literal["causal-lm", "embedding"]


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One served model."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    path: Annotated[str, msgspec.Meta(min_length=1)]
    aliases: list[str] = []
    dtype: Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] | None = None
    device: str = "cpu"
    type: ModelType | None = None
    quantize: Literal["auto", "none", "int4", "int8"] = "auto"
    compile: bool | None = None
    max_model_len: Annotated[int, msgspec.Meta(ge=2)] | None = None
    speculative: Literal["ngram"] | None = None  # prompt-lookup speculative decoding (same output, faster)
    context_length: Annotated[int, msgspec.Meta(ge=2)] | None = None  # the older name of max_model_len


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_running: Annotated[int, msgspec.Meta(ge=1)] = 16
    max_queued: Annotated[int, msgspec.Meta(ge=0)] = 64
    kv_cache_memory: int | str | None = None  # per model; see llmfn.engine.blocks.parse_bytes
    kv_cache_dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] | None = None  # engine/paged.py
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 4096
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 4 * 1024 * 1024
    request_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    shutdown_timeout: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    sse_keepalive: Annotated[float, msgspec.Meta(gt=0)] = 15.0


class AccessLogConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    enabled: bool = True
    format: Literal["text", "json"] = "text"


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    models: list[ModelConfig] = []
    api_keys: list[str] = []
    cors_origins: list[str] = []
    limits: Limits = Limits()
    access_log: AccessLogConfig = AccessLogConfig()


def default_models() -> list[ModelConfig]:
    """SmolLM2-135M-Instruct for chat and all-MiniLM-L6-v2 for embeddings (the registry aliases)."""
    from llmfn.loading.registry import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL

    return [
        ModelConfig(name=DEFAULT_CHAT_MODEL, path=DEFAULT_CHAT_MODEL, type="causal-lm"),
        ModelConfig(name=DEFAULT_EMBEDDING_MODEL, path=DEFAULT_EMBEDDING_MODEL, type="embedding"),
    ]


def models_from_paths(paths: list[str]) -> list[ModelConfig]:
    """ModelConfigs for `llmfn serve --model PATH ...`: each named after its alias, file or folder."""
    out = []
    for p in paths:
        name = Path(p).stem if p.endswith(".gguf") else Path(p.rstrip("/")).name or p
        out.append(ModelConfig(name=name, path=p))
    return out


def load_config(path: str | Path | None = None) -> ServerConfig:
    """The config in a TOML file, or the defaults when path is None; models default as well when the
    file lists none. Raises LlmfnError (one line) for unreadable, malformed or inconsistent files."""
    if path is None:
        return check_config(ServerConfig(models=default_models()))
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise LlmfnError(f"{file}: cannot read config ({e.strerror or e})") from None
    try:
        config = msgspec.toml.decode(raw, type=ServerConfig)
    except msgspec.ValidationError as e:
        raise LlmfnError(f"{file}: {_field_message(str(e))}") from None
    except msgspec.DecodeError as e:
        raise LlmfnError(f"{file}: not valid TOML ({_one_line(str(e))})") from None
    if not config.models:
        config = msgspec.structs.replace(config, models=default_models())
    return check_config(config, file)


def check_config(config: ServerConfig, file: Path | str = "config") -> ServerConfig:
    """Cross-field checks msgspec cannot express: unique model names, non-empty keys."""
    seen: dict[str, str] = {}
    for i, m in enumerate(config.models):
        for name in (m.name, *m.aliases):
            if not name:
                raise LlmfnError(f"{file}: models[{i}] has an empty alias")
            if name in seen:
                raise LlmfnError(
                    f"{file}: model name {name!r} is used twice (by {seen[name]!r} and {m.name!r})"
                )
            seen[name] = m.name
    if any(not k.strip() for k in config.api_keys):
        raise LlmfnError(f"{file}: api_keys contains an empty key")
    if config.limits.kv_cache_memory is not None:
        from llmfn.engine.blocks import parse_bytes

        try:
            parse_bytes(config.limits.kv_cache_memory)
        except LlmfnError as e:
            raise LlmfnError(f"{file}: limits.{e}") from None
    return config


def api_keys(config: ServerConfig) -> list[str]:
    """The file's keys plus those in LLMFN_API_KEYS."""
    extra = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return list(dict.fromkeys([*config.api_keys, *extra]))


def check_model_paths(config: ServerConfig) -> None:
    """Fail fast, before any server starts, on a model path that is neither a file, a folder nor an
    alias whose weights package is installed. (Loading itself happens in each worker.)"""
    from llmfn.loading.registry import ALIASES, package_path

    for m in config.models:
        if m.path in ALIASES:
            package_path(ALIASES[m.path])  # raises CheckpointError naming the pip package
        elif not Path(m.path).expanduser().exists():
            raise LlmfnError(
                f"model {m.name!r}: {m.path}: no such model folder, GGUF file or alias "
                f"(aliases: {', '.join(ALIASES)})"
            )


def encode_env(config: ServerConfig) -> str:
    return msgspec.json.encode(config).decode()


def config_from_env() -> ServerConfig:
    """The config `run` put in the environment, else LLMFN_SERVE_CONFIG_FILE, else the defaults."""
    if raw := os.environ.get(CONFIG_ENV):
        try:
            return check_config(msgspec.json.decode(raw, type=ServerConfig), CONFIG_ENV)
        except msgspec.MsgspecError as e:
            raise LlmfnError(f"{CONFIG_ENV}: {_field_message(str(e))}") from None
    return load_config(os.environ.get(CONFIG_FILE_ENV) or None)


def _field_message(message: str) -> str:
    """msgspec's 'Expected `int`, got `str` - at `$.limits.max_tokens`' as 'limits.max_tokens: ...'."""
    text, sep, where = message.rpartition(" - at ")
    if not sep:
        return _one_line(message)
    return f"{where.strip('`').removeprefix('$.').removeprefix('$')}: {_one_line(text)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
