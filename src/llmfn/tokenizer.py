"""Tokenizers behind one interface, backed by Hugging Face `tokenizers`.

`load_tokenizer(path)` reads a `tokenizer.json` folder or file (byte-level BPE, WordPiece,
Unigram, SentencePiece-style BPE), a SentencePiece `.model`, a tiktoken rank file, a BERT
`vocab.txt` or a `.gguf` file; each becomes a `tokenizers` pipeline for encoding (Rust, no
per-token Python) plus a table of each token's bytes for decoding and streaming. Neither
`sentencepiece` nor `tiktoken` is imported here: they are the tests' reference oracles.

- `encode(text)` treats all text as text: special-token strings in it never become their ids.
- `encode_trusted(text)` is for template text: special-token strings become their ids.
- SentencePiece `.model` files and the known tiktoken patterns also have a native C encoder
  (`llmfn.tokenization.native_spm`, `native_bpe`), tested equal to sentencepiece / tiktoken, which
  `encode` and `encode_batch` use when it builds here (LLMFN_NATIVE_TOKENIZERS=0 turns it off);
  `tokenizers` remains the path for everything else.
- `decode(ids)` joins the tokens' bytes and decodes them once as UTF-8 (invalid bytes become
  U+FFFD); `stream()` does the same incrementally and emits only complete characters, so what
  it emits, concatenated, equals `decode(ids)` for any id sequence.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as _HFTokenizer

from llmfn.errors import TokenizerError
from llmfn.tokenization.native_io import without_surrogates

__all__ = ["StreamDecoder", "Tokenizer", "load_tokenizer"]


_SURROGATE = re.compile("[\ud800-\udfff]")


class NativeEncoder(Protocol):
    """A format's own C encoder (see llmfn.tokenization.native_*): plain text to ids."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


def native_tokenizers_enabled() -> bool:
    """LLMFN_NATIVE_TOKENIZERS=0 keeps every format on `tokenizers` (for comparison and tests)."""
    return os.environ.get("LLMFN_NATIVE_TOKENIZERS", "1") != "0"


class StreamDecoder:
    """Incremental detokenizer: `add(id)` returns the newly completed text, `flush()` the rest.

    It works on the tokens' raw bytes through an incremental UTF-8 decoder, anchored at the start
    of the sequence (where a SentencePiece dummy-prefix space is dropped), so byte-fallback pieces
    and repeated spaces come out exactly as `Tokenizer.decode` gives them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = tokenizer._special_id_set if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def add(self, token_id: int) -> str:
        tok = self._tok
        if not 0 <= token_id < len(tok._token_bytes):
            raise TokenizerError(f"token id {token_id} is out of range [0, {len(tok._token_bytes)})")
        if token_id in self._skip:
            return ""
        data = tok._token_bytes[token_id]
        if self._at_start and data:
            self._at_start = False
            data = tok._first_bytes.get(token_id, data)
        return self._utf8.decode(data)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """One tokenizer of any supported format; see the module docstring for the contract."""

    def __init__(
        self,
        hf: _HFTokenizer,
        *,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        pad_id: int | None = None,
        special_tokens: dict[str, int] | None = None,
        token_bytes: Sequence[bytes] | None = None,
        first_bytes: dict[int, bytes] | None = None,
        normalize: Callable[[str], str] | None = None,
        specials_in_hf: bool | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        format: str = "tokenizer.json",
        pieces: Sequence[str] | None = None,
        protected: dict[str, int] | None = None,
        model_only: _HFTokenizer | None = None,
        native: NativeEncoder | None = None,
    ):
        from llmfn.tokenization.hf_json import hf_decode_tables, hf_special_tokens

        hf.no_padding()  # a shipped tokenizer.json may pad or truncate: never in encode()
        hf.no_truncation()
        if special_tokens is None:
            special_tokens = hf_special_tokens(hf)
            specials_in_hf = True if specials_in_hf is None else specials_in_hf
        if token_bytes is None:
            token_bytes, derived_first = hf_decode_tables(hf)
            first_bytes = derived_first if first_bytes is None else first_bytes
        self.hf = hf
        self.hf.encode_special_tokens = True  # plain text: special strings stay text
        self._hf_trusted: _HFTokenizer | None = None
        if specials_in_hf:
            self._hf_trusted = _HFTokenizer.from_str(hf.to_str())
            self._hf_trusted.encode_special_tokens = False
        self._normalize = normalize
        self._native = native
        # With `model_only`, `normalize` does all the normalization in Python (C-speed string
        # methods) and the Rust side runs the pre-tokenizer and model alone.
        self._encoder = model_only if model_only is not None else hf
        # Strings that are always one token, cut out of the normalized text (SentencePiece BPE's
        # user-defined pieces); the text between them is encoded by the model alone.
        self._protected = dict(protected or {})
        self._protected_re = None
        self._hf_model_only: _HFTokenizer | None = None
        if self._protected:
            self._protected_re = re.compile(
                "|".join(map(re.escape, sorted(self._protected, key=len, reverse=True)))
            )
            self._hf_model_only = _HFTokenizer.from_str(self._encoder.to_str())
            self._hf_model_only.normalizer = None
        self._token_bytes: list[bytes] = list(token_bytes)
        self._first_bytes: dict[int, bytes] = dict(first_bytes or {})
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self._special_id_set = frozenset(self.special_tokens.values())
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self.bos_id: int | None = bos_id
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        self.pad_id: int | None = pad_id
        self.unk_id: int | None = unk_id
        self.add_bos: bool = add_bos
        self.format: str = format
        self._pieces = list(pieces) if pieces is not None else None
        self._piece_ids = {p: i for i, p in enumerate(self._pieces)} if self._pieces is not None else None

    def __len__(self) -> int:
        return len(self._token_bytes)

    def __repr__(self) -> str:
        return f"Tokenizer(format={self.format!r}, size={len(self)}, bos_id={self.bos_id}, eos_ids={self.eos_ids})"

    # --- encoding ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Plain text: special-token strings inside it stay text. Lone surrogates are encoded as
        U+FFFD, as tiktoken does (the native encoders do so themselves; `tokenizers` refuses them)."""
        try:
            return self._encode(text)
        except TypeError:
            if not isinstance(text, str) or _SURROGATE.search(text) is None:
                raise
            return self._encode(without_surrogates(text))

    def _encode(self, text: str) -> list[int]:
        if self._native is not None:
            return self._native.encode(text)
        if self._normalize is not None:
            text = self._normalize(text)
        if self._protected_re is not None and self._protected_re.search(text):
            return self._encode_protected(text)
        # encode_batch_fast skips the offset bookkeeping that encode() does: about twice as fast.
        return self._encoder.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def _encode_protected(self, text: str) -> list[int]:
        if self._encoder.normalizer is not None:
            text = self._encoder.normalizer.normalize_str(text)
        cuts = list(self._protected_re.finditer(text))
        bounds = [0] + [x for m in cuts for x in (m.start(), m.end())] + [len(text)]
        segments = [text[bounds[2 * k] : bounds[2 * k + 1]] for k in range(len(cuts) + 1)]
        encoded = self._hf_model_only.encode_batch_fast(segments, add_special_tokens=False)
        ids = list(encoded[0].ids)
        for m, enc in zip(cuts, encoded[1:], strict=True):
            ids.append(self._protected[m.group()])
            ids += enc.ids
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """A raw-text prompt (completions, `llmfn run --raw`): plain text, with the BOS id in front
        when the tokenizer adds one (Llama 2 style), as HF's default add_special_tokens does."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel (in C or inside `tokenizers`)."""
        texts = list(texts)
        try:
            return self._encode_batch(texts)
        except TypeError:
            if not all(isinstance(t, str) for t in texts) or not any(map(_SURROGATE.search, texts)):
                raise
            return self._encode_batch([without_surrogates(t) for t in texts])

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._native is not None:
            return self._native.encode_batch(texts)
        if self._normalize is not None:
            texts = [self._normalize(t) for t in texts]
        out = [e.ids for e in self._encoder.encode_batch_fast(texts, add_special_tokens=False)]
        if self._protected_re is not None:
            for k, text in enumerate(texts):
                if self._protected_re.search(text):
                    out[k] = self._encode_protected(text)
        return out

    def encode_trusted(self, text: str) -> list[int]:
        """Template text: special-token strings become their ids."""
        if self._hf_trusted is not None:
            return self._hf_trusted.encode_batch_fast([text], add_special_tokens=False)[0].ids
        if self._special_re is None:
            return self.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self.encode(text[pos : m.start()])
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:])
        return ids

    def token_to_id(self, token: str) -> int | None:
        """The id of a token by its vocabulary string (special tokens included), or None."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if self._piece_ids is not None:
            return self._piece_ids.get(token)
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id (for tiktoken, the bytes' byte-level spelling)."""
        if self._pieces is not None:
            return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else None
        return self.hf.id_to_token(token_id)

    # --- decoding ---------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (mid-sequence form)."""
        return self._token_bytes[token_id]

    def first_token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for at the start of a text (SentencePiece drops its dummy-prefix
        space there; every other token reads as `token_bytes`)."""
        return self._first_bytes.get(token_id, self._token_bytes[token_id])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if not ids:
            return ""
        n = len(self._token_bytes)
        if min(ids) < 0 or max(ids) >= n:
            bad = next(i for i in ids if not 0 <= i < n)
            raise TokenizerError(f"token id {bad} is out of range [0, {n})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_id_set]
        table = self._token_bytes
        parts = [table[i] for i in ids]
        if self._first_bytes:
            for k, part in enumerate(parts):
                if part:
                    parts[k] = self._first_bytes.get(ids[k], part)
                    break
        return b"".join(parts).decode("utf-8", errors="replace")

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


# --- loading ------------------------------------------------------------------------------------


def load_tokenizer(
    path: str | Path,
    *,
    pattern: str | None = None,
    special_tokens: dict[str, int] | None = None,
) -> Tokenizer:
    """Load a tokenizer folder or file, detecting its format.

    A folder is searched for `tokenizer.json`, then a SentencePiece `*.model`, a `*.tiktoken`,
    a `vocab.txt`, then a single `*.gguf`. `pattern` and `special_tokens` are for tiktoken files
    that llmfn does not know by name (see `llmfn.tokenization.tiktoken_file`).
    """
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or folder")
    file = _find_file(path) if path.is_dir() else path
    name = file.name.lower()
    if name.endswith(".gguf"):
        return _load_gguf(file)
    if name.endswith(".tiktoken"):
        return _load_tiktoken(file, pattern, special_tokens)
    if name.endswith(".model"):
        return _load_sentencepiece(file)
    if name.endswith(".txt"):
        return _load_vocab_txt(file)
    if name.endswith(".json"):
        return _load_tokenizer_json(file)
    raise TokenizerError(
        f"{file}: unknown tokenizer format (expected tokenizer.json, .model, .tiktoken, vocab.txt or .gguf)"
    )


def _find_file(folder: Path) -> Path:
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    for pattern in (
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "*.model",
        "*.tiktoken",
        "vocab.txt",
        "*.gguf",
    ):
        found = sorted(folder.glob(pattern))
        if len(found) == 1 or (found and "*" not in pattern):
            return found[0]
        if len(found) > 1:
            raise TokenizerError(f"{folder}: several {pattern} files; pass the file itself")
    raise TokenizerError(f"{folder}: no tokenizer.json, *.model, *.tiktoken, vocab.txt or *.gguf")


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{file}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def tokenizer_from_hf(
    hf: _HFTokenizer, cfg: dict, extra_eos: Iterable[int] = (), source: str = ""
) -> Tokenizer:
    """A Tokenizer from a `tokenizers` object and its `tokenizer_config.json` dict."""

    def token_id(role: str) -> int | None:
        tok = _content(cfg.get(role))
        if not tok:
            return None
        i = hf.token_to_id(tok)
        if i is None:
            raise TokenizerError(f"{source}: {role} {tok!r} is not in the vocabulary")
        return i

    eos = token_id("eos_token")
    unk = token_id("unk_token")
    return Tokenizer(
        hf,
        bos_id=token_id("bos_token"),
        eos_ids=([] if eos is None else [eos]) + list(extra_eos),
        pad_id=token_id("pad_token"),
        unk_id=unk,
        add_bos=bool(cfg.get("add_bos_token", False)),
        format="tokenizer.json",
    )


def _load_tokenizer_json(file: Path) -> Tokenizer:
    try:
        hf = _HFTokenizer.from_file(str(file))
    except Exception as e:
        raise TokenizerError(f"{file}: cannot read tokenizer: {e}") from None
    folder = file.parent
    cfg = _read_json(folder / "tokenizer_config.json")
    for role, tok in _read_json(folder / "special_tokens_map.json").items():
        cfg.setdefault(role, tok)
    extra = _ids(_read_json(folder / "generation_config.json").get("eos_token_id"))
    extra += _ids(_read_json(folder / "config.json").get("eos_token_id"))
    return tokenizer_from_hf(hf, cfg, extra, str(file))


def _load_sentencepiece(file: Path) -> Tokenizer:
    from llmfn.tokenization import sentencepiece_model as spm

    model = spm.read_model(file)
    native = None
    if native_tokenizers_enabled():
        from llmfn.tokenization.native_spm import NativeSentencePiece

        native = NativeSentencePiece.build(model)
    built = spm.build(model, encodes=native is None)
    return Tokenizer(
        built.hf,
        bos_id=built.bos_id,
        eos_ids=[] if built.eos_id is None else [built.eos_id],
        pad_id=built.pad_id,
        special_tokens=built.special_tokens,
        token_bytes=built.token_bytes,
        first_bytes=built.first_bytes,
        normalize=built.normalize,
        specials_in_hf=False,
        unk_id=built.unk_id,
        format="sentencepiece",
        pieces=built.pieces,
        protected=built.protected,
        model_only=built.model_only,
        native=native,
    )


def _load_tiktoken(file: Path, pattern: str | None, special_tokens: dict[str, int] | None) -> Tokenizer:
    from llmfn.tokenization import tiktoken_file

    spec = tiktoken_file.resolve(file, pattern, special_tokens)
    size = max([*spec.ranks.values(), *spec.special_tokens.values()]) + 1
    table = [b""] * size
    for token, rank in spec.ranks.items():
        table[rank] = token
    for token, i in spec.special_tokens.items():
        table[i] = token.encode("utf-8")
    eos = spec.special_tokens.get(spec.eos) if spec.eos else None
    hf = tiktoken_file.build_hf(spec)
    native = None
    if native_tokenizers_enabled():
        from llmfn.tokenization.native_bpe import NativeRankBPE

        native = NativeRankBPE.build(spec.ranks, spec.pattern)
    pieces = [hf.id_to_token(i) or "" for i in range(size)]
    for token, i in spec.special_tokens.items():
        pieces[i] = token
    return Tokenizer(
        hf,
        eos_ids=[] if eos is None else [eos],
        special_tokens=spec.special_tokens,
        token_bytes=table,
        first_bytes={},
        specials_in_hf=False,
        format="tiktoken",
        pieces=pieces,
        native=native,
    )


def _load_vocab_txt(file: Path) -> Tokenizer:
    from llmfn.tokenization import wordpiece

    hf, roles, fix = wordpiece.build(file, wordpiece.folder_config(file.parent))
    ids = {role: hf.token_to_id(tok) for role, tok in roles.items()}
    return Tokenizer(
        hf,
        bos_id=ids.get("cls_token"),
        eos_ids=[ids["sep_token"]] if "sep_token" in ids else [],
        pad_id=ids.get("pad_token"),
        unk_id=ids.get("unk_token"),
        normalize=fix,
        format="wordpiece",
    )


def _load_gguf(file: Path) -> Tokenizer:
    from llmfn.tokenization.gguf import gguf_eos_ids, read_gguf_metadata, tokenizer_files_from_gguf

    try:
        meta = read_gguf_metadata(file)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file}: cannot read GGUF metadata: {e}") from None
    files = tokenizer_files_from_gguf(meta)
    hf = _HFTokenizer.from_str(files["tokenizer.json"])
    tok = tokenizer_from_hf(hf, json.loads(files["tokenizer_config.json"]), gguf_eos_ids(meta), str(file))
    tok.format = "gguf"
    return tok
