"""BERT WordPiece from a `vocab.txt`, with lowercasing, accent stripping and Chinese-character
splitting taken from the folder's `tokenizer_config.json` (as transformers' BertTokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llmfn.errors import TokenizerError

_DEFAULT_SPECIALS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}


def read_vocab(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
        token = line.rstrip("\r")
        if token or i == 0:
            vocab.setdefault(token, i)
    if not vocab:
        raise TokenizerError(f"{path}: empty vocab.txt")
    return vocab


def folder_config(folder: Path) -> dict:
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            try:
                cfg.update(json.loads(f.read_text()))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{f}: invalid JSON ({e})") from None
    return cfg


def _content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def build(vocab_file: Path, cfg: dict) -> tuple[HFTokenizer, dict[str, str]]:
    """The pipeline and the special-token roles (role -> token string) found in the vocabulary."""
    vocab = read_vocab(vocab_file)
    roles = {role: _content(cfg.get(role, default)) for role, default in _DEFAULT_SPECIALS.items()}
    roles = {role: tok for role, tok in roles.items() if tok and tok in vocab}
    unk = roles.get("unk_token")
    if unk is None:
        raise TokenizerError(f"{vocab_file}: no unknown token ([UNK]) in the vocabulary")
    lowercase = bool(cfg.get("do_lower_case", True))
    hf = HFTokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
        strip_accents=cfg.get("strip_accents"),
        lowercase=lowercase,
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    hf.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in roles.values()])
    return hf, roles
