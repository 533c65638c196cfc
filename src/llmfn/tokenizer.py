"""Tokenizers behind one interface, backed by Hugging Face `tokenizers`.

(Minimal first version: tokenizer.json only. The tokenizer issue extends it.)"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from llmfn.errors import TokenizerError


class StreamDecoder:
    """Incremental detokenizer: emits only complete UTF-8 text."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self._emitted = text[len(self._emitted) :], text
        return delta

    def flush(self) -> str:
        text = self._tok.decode(self._ids)
        delta, self._emitted = text[len(self._emitted) :], text
        return delta


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, *, bos_id=None, eos_ids=(), pad_id=None):
        self.hf = hf
        self.bos_id: int | None = bos_id
        self.eos_ids: tuple[int, ...] = tuple(eos_ids)
        self.pad_id: int | None = pad_id

    def __len__(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text: special-token strings inside it stay text."""
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=True).ids

    def encode_trusted(self, text: str) -> list[int]:
        """Template text: special-token strings become their ids."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        hf = _HFTokenizer.from_file(str(file))
    except Exception as e:
        raise TokenizerError(f"{file}: cannot read tokenizer: {e}") from None
    cfg_file = file.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}

    def token_id(name):
        tok = cfg.get(name)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return hf.token_to_id(tok) if tok else None

    eos = token_id("eos_token")
    return Tokenizer(hf, bos_id=token_id("bos_token"), eos_ids=() if eos is None else (eos,), pad_id=token_id("pad_token"))
