"""sentence-transformers folders (modules.json, 0_Transformer/, 1_Pooling/, ...) and plain BertModel
folders, read into Model(kind="embedding") for llmfn.embed.

`Model.extra` holds what sentence-transformers keeps in its module folders, as plain data:
    {"pooling": ("mean",),            # 1_Pooling/config.json; several modes are concatenated
     "normalize": True,               # a Normalize module in modules.json
     "max_seq_length": 256,           # sentence_bert_config.json (tokens, [CLS] and [SEP] included)
     "do_lower_case": False,          # sentence_bert_config.json
     "prefix_ids": (101,), "suffix_ids": (102,)}   # what the tokenizer's post-processor wraps around text
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmfn.errors import CheckpointError, UnsupportedModelError
from llmfn.loading import bert
from llmfn.model import Model
from llmfn.tokenizer import Tokenizer, load_tokenizer

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# legacy 1_Pooling/config.json booleans, in sentence-transformers' concatenation order
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(file: Path, kind: type = dict):
    """A JSON file's content, which must be a `kind` (dict or list)."""
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read JSON ({e})") from None
    if not isinstance(raw, kind):
        raise CheckpointError(f"{file}: expected a JSON {'object' if kind is dict else 'list'}")
    return raw


def _pooling_modes(raw: dict, file: Path) -> tuple[str, ...]:
    mode = raw.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for k, m in _LEGACY_POOLING.items() if raw.get(k)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise UnsupportedModelError(f"{file}: pooling mode {bad or modes} (supported: {', '.join(POOLING_MODES)})")
    if raw.get("include_prompt") is False:
        raise UnsupportedModelError(f"{file}: include_prompt=false (prompt-excluding pooling) is not supported")
    return modes


def _modules(root: Path) -> tuple[Path, Path | None, bool]:
    """(transformer folder, pooling folder or None, normalize) from modules.json; a plain BertModel
    folder without modules.json gets mean pooling and no normalization, as sentence-transformers does."""
    file = root / "modules.json"
    if not file.is_file():
        return root, None, False
    mods = _read_json(file, list)
    transformer, pooling, normalize = None, None, False
    for m in mods:
        if not isinstance(m, dict):
            raise CheckpointError(f"{file}: module entry {m!r} is not an object")
        kind, folder = str(m.get("type", "")).rsplit(".", 1)[-1], root / str(m.get("path", ""))
        if kind == "Transformer" and transformer is None:
            transformer = folder
        elif kind == "Pooling" and pooling is None:
            pooling = folder
        elif kind == "Normalize":
            normalize = True
        else:
            raise UnsupportedModelError(f"{file}: module {m.get('type')!r} is not supported")
    if transformer is None:
        raise UnsupportedModelError(f"{file}: no Transformer module")
    if pooling is None:
        raise UnsupportedModelError(f"{file}: no Pooling module (token embeddings only)")
    return transformer, pooling, normalize


def _wrap_ids(tok: Tokenizer, folder: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids the tokenizer's post-processor puts before and after a single text ([CLS], [SEP])."""
    enc = tok.hf.encode("a", add_special_tokens=True)
    content = [i for i, s in enumerate(enc.special_tokens_mask) if not s]
    if content and len(enc.ids) > len(content):
        return tuple(enc.ids[: content[0]]), tuple(enc.ids[content[-1] + 1 :])
    # no post-processor: the tokenizer config's cls / sep tokens, as BertTokenizer adds them
    cfg_file = folder / "tokenizer_config.json"
    tcfg = _read_json(cfg_file) if cfg_file.is_file() else {}

    def tid(key: str, default: str) -> int | None:
        t = tcfg.get(key, default)
        return tok.hf.token_to_id(t["content"] if isinstance(t, dict) else t)

    cls, sep = tid("cls_token", "[CLS]"), tid("sep_token", "[SEP]")
    return (() if cls is None else (cls,)), (() if sep is None else (sep,))


def load_embedding_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Model:
    """A sentence-transformers folder (modules.json, 1_Pooling, ...) or a plain BertModel folder."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a model folder")
    folder, pooling_dir, normalize = _modules(root)
    cfg = bert.read_config(folder)
    params = bert.pack_params(bert.load_params(folder, cfg, dtype=dtype or torch.float32, device=device))
    tok = load_tokenizer(folder)

    modes: tuple[str, ...] = ("mean",)
    if pooling_dir is not None:
        pfile = pooling_dir / "config.json"
        pcfg = _read_json(pfile) if pfile.is_file() else {}
        modes = _pooling_modes(pcfg, pfile)
        width = pcfg.get("embedding_dimension", pcfg.get("word_embedding_dimension", cfg.dim))
        if width != cfg.dim:
            raise CheckpointError(f"{pfile}: embedding dimension {width} != hidden_size {cfg.dim}")

    sfile = folder / "sentence_bert_config.json"
    sbert = _read_json(sfile) if sfile.is_file() else {}
    max_len = sbert.get("max_seq_length")
    if max_len is None:
        tfile = folder / "tokenizer_config.json"
        max_len = (_read_json(tfile) if tfile.is_file() else {}).get("model_max_length", cfg.max_positions)
    max_len = min(int(max_len), cfg.max_positions)
    prefix, suffix = _wrap_ids(tok, folder)
    if max_len < len(prefix) + len(suffix) + 1:
        raise CheckpointError(f"{sfile}: max_seq_length {max_len} leaves no room for text")
    extra = {
        "pooling": modes,
        "normalize": normalize,
        "max_seq_length": max_len,
        "do_lower_case": bool(sbert.get("do_lower_case", False)),
        "prefix_ids": prefix,
        "suffix_ids": suffix,
    }
    return Model(kind="embedding", cfg=cfg, params=params, tokenizer=tok, path=root, extra=extra)
