"""What the commands share: errors as one line, loading a model with progress, the model's sampling
defaults, and the sampling flags (derived from llmfn.sampling.KNOBS, so their ranges are the server's)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from llmfn.errors import LlmfnError
from llmfn.model import GenerationDefaults
from llmfn.sampling import KNOBS, Knob

# the sampling knobs a model's generation_config.json may set
GENERATION_CONFIG_KNOBS = tuple(f.name for f in fields(GenerationDefaults) if f.name in KNOBS)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, LlmfnError) or isinstance(error, OSError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_model(name: str, dtype: str | None = None, device: str = "cpu", compile: bool | None = None,
               quantize: str | None = "auto"):
    """llmfn.load with progress: GGUF first-use preparation and loading each get a spinner on a TTY."""
    import llmfn
    from llmfn.cli.progress import spinner
    from llmfn.loading import effective_quantize, gguf_source, resolve
    from llmfn.loading.registry import ALIASES, converted_path

    method = effective_quantize(name, dtype, quantize)
    if method is None:  # dense: a GGUF is converted once into the cache (quantized, its blocks are read)
        stem = name if name in ALIASES else Path(name).stem.lower()
        first_use = gguf_source(name) is not None and not (converted_path(stem) / "model.safetensors").exists()
        with spinner(f"preparing {name} (first use: converting the GGUF into the cache)" if first_use
                     else f"resolving {name}"):  # fmt: skip
            resolve(name)  # converts a GGUF once; load finds it done (and keeps an alias's defaults)
    how = "" if method is None else " on its GGUF blocks" if gguf_source(name) else f" with {method} weights"
    with spinner(f"loading {name}{how}"):
        return llmfn.load(name, dtype=dtype, device=device, compile=compile, quantize=quantize)


def model_defaults(model) -> dict:
    """Sampling defaults: the model's generation_config.json for the knobs it sets, KNOBS' for the rest
    (but the seed, whose default is none: a fresh one per answer)."""
    return {name: getattr(model.generation, name) if name in GENERATION_CONFIG_KNOBS else knob.default
            for name, knob in KNOBS.items() if knob.default is not None}  # fmt: skip


# ------------------------------------------------------------------------------------ sampling flags


def parse_knob(knob: Knob, text: str):
    """text as the knob's type, checked against its range; ValueError when it is neither."""
    value = knob.kind(text)  # ValueError for "warm", or "1.5" as an int
    if not knob.ok(value):
        raise ValueError(f"out of range: {value!r}")
    return value


def flag_type(knob: Knob):
    """An argparse `type=` for the knob: an out-of-range or malformed value is a one-line usage error,
    `argument --top-p: must be in (0, 1], got '2'`."""

    def parse(text: str):
        try:
            return parse_knob(knob, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {knob.rule()}, got {text!r}") from None

    return parse


def flag_help(name: str, knob: Knob) -> str:
    """The knob's meaning, range and default: "0 is greedy; in [0, 2]; default: the model's generation_config"."""
    if knob.default is None:
        default = ""  # the knob's help says what none means
    elif name in GENERATION_CONFIG_KNOBS:
        default = "; default: the model's generation_config"
    else:
        default = f"; default {knob.default}"
    return f"{knob.help}; {knob.rule()}{default}".replace("%", "%%")  # argparse formats help with %


def add_sampling_flags(p: argparse.ArgumentParser, max_tokens_help: str) -> None:
    """--max-tokens and one flag per sampling knob (`top_p` -> `--top-p`) in a "sampling" group."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, help=max_tokens_help)
    for name, knob in KNOBS.items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=flag_type(knob), metavar=name.upper(),
                       help=flag_help(name, knob))


def sampling_settings(args: argparse.Namespace) -> dict:
    """The sampling flags that were given, as generate() keywords."""
    return {name: getattr(args, name) for name in KNOBS if getattr(args, name, None) is not None}
