"""SentencePiece `.model` files, read without the `sentencepiece` library.

A `.model` file is a `ModelProto` protobuf; the few fields llmfn needs are read by the small
wire-format reader below. The model becomes a `tokenizers` BPE or Unigram pipeline that
encodes as `sentencepiece` does:
- normalization: the precompiled character map (nmt_nfkc and others) is applied by llmfn with
  SentencePiece's own rule, longest match over the raw text, because `tokenizers`' Precompiled
  normalizer works per grapheme and so differs on combining marks; whitespace handling (strip,
  collapse, dummy prefix, "▁" escaping) is left to `tokenizers` normalizers;
- control, unknown, byte and unused pieces are never matched from text: BPE gets no merge
  rules that produce them and Unigram sees them under names that normalized text cannot hold
  (they contain a plain space, which escaping always replaces);
- user-defined pieces are kept whole and exempt from normalization.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from llmfn.errors import TokenizerError
from llmfn.tokenization.byte_level import merges_by_priority

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"  # "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class SentencePieceModel:
    pieces: list[Piece]
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_surface: str = " \u2047 "
    treat_whitespace_as_suffix: bool = False
    charsmap: bytes = b""
    normalizer_name: str = ""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    extra: dict = field(default_factory=dict)


# --- protobuf wire format -------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise TokenizerError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of one protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise TokenizerError("truncated protobuf field")
        yield number, wire, value


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_model_proto(data: bytes) -> SentencePieceModel:
    m = SentencePieceModel(pieces=[])
    for number, _, value in _fields(data):
        if number == 1:
            p = Piece("")
            for n, _, v in _fields(value):
                if n == 1:
                    p.piece = v.decode("utf-8")
                elif n == 2:
                    p.score = struct.unpack("<f", v)[0]
                elif n == 3:
                    p.type = v
            m.pieces.append(p)
        elif number == 2:  # TrainerSpec
            for n, _, v in _fields(value):
                if n == 3:
                    m.model_type = v
                elif n == 35:
                    m.byte_fallback = bool(v)
                elif n == 40:
                    m.unk_id = _int32(v)
                elif n == 41:
                    m.bos_id = _int32(v)
                elif n == 42:
                    m.eos_id = _int32(v)
                elif n == 43:
                    m.pad_id = _int32(v)
                elif n == 44:
                    m.unk_surface = v.decode("utf-8")
                elif n == 24:
                    m.treat_whitespace_as_suffix = bool(v)
        elif number == 3:  # NormalizerSpec
            for n, _, v in _fields(value):
                if n == 1:
                    m.normalizer_name = v.decode("utf-8")
                elif n == 2:
                    m.charsmap = bytes(v)
                elif n == 3:
                    m.add_dummy_prefix = bool(v)
                elif n == 4:
                    m.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    m.escape_whitespaces = bool(v)
    if not m.pieces:
        raise TokenizerError("no pieces: not a SentencePiece model")
    return m


def read_model(path: str | Path) -> SentencePieceModel:
    try:
        return parse_model_proto(Path(path).read_bytes())
    except TokenizerError as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    except (UnicodeDecodeError, struct.error, IndexError) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None


# --- the precompiled character map ----------------------------------------------------------


@lru_cache(maxsize=8)
def charsmap_table(blob: bytes) -> dict[str, str]:
    """All (source -> replacement) pairs of a precompiled charsmap.

    The blob is a uint32 trie size, a darts-clone double-array trie over UTF-8 source bytes, then
    the NUL-terminated replacement strings the trie's values point into.
    """
    if len(blob) < 4:
        return {}
    (trie_size,) = struct.unpack("<I", blob[:4])
    units = np.frombuffer(blob[4 : 4 + trie_size], dtype="<u4").astype(np.int64)
    strings = blob[4 + trie_size :]
    labels = units & 0x800000FF
    leaf = (units >> 8) & 1
    offsets = (units >> 10) << ((units & (1 << 9)) >> 6)
    values = units & 0x7FFFFFFF
    n = len(units)
    out: dict[str, str] = {}
    byte_range = np.arange(1, 256, dtype=np.int64)
    stack: list[tuple[int, bytes]] = [(int(offsets[0]), b"")]
    while stack:
        base, key = stack.pop()
        pos = base ^ byte_range
        ok = pos < n
        pos, chars = pos[ok], byte_range[ok]
        hit = labels[pos] == chars
        for p, c in zip(pos[hit].tolist(), chars[hit].tolist(), strict=True):
            child_key = key + bytes([c])
            child = p ^ int(offsets[p])
            if leaf[p]:
                v = int(values[child])
                end = strings.index(b"\0", v)
                try:
                    out[child_key.decode("utf-8")] = strings[v:end].decode("utf-8")
                except UnicodeDecodeError:
                    pass
            stack.append((child, child_key))
    return out


def _trie_regex(keys: list[str]) -> str:
    """A regex matching the longest of `keys` at a position (keys as literal strings)."""
    trie: dict = {}
    for k in keys:
        node = trie
        for ch in k:
            node = node.setdefault(ch, {})
        node[""] = True

    def emit(node: dict) -> str:
        ends = "" in node
        singles, branches = [], []
        for ch in sorted(c for c in node if c):
            child = node[ch]
            if set(child) == {""}:
                singles.append(re.escape(ch))
            else:
                branches.append(re.escape(ch) + emit(child))
        alts = branches + ([f"[{''.join(singles)}]" if len(singles) > 1 else singles[0]] if singles else [])
        body = "|".join(alts)
        if not alts:
            return ""
        group = f"(?:{body})" if len(alts) > 1 or ends else body
        return group + "?" if ends else group

    return emit(trie)


class CharsmapNormalizer:
    """SentencePiece's character-map normalization: at each position, a user-defined piece if
    one matches (kept as is), else the longest source string of the map, else the character."""

    def __init__(self, table: dict[str, str], protected: list[str]):
        self.table = {k: v for k, v in table.items() if k != v}
        alts = []
        if protected:
            alts.append("|".join(re.escape(p) for p in sorted(protected, key=len, reverse=True)))
        if self.table:
            alts.append(_trie_regex(list(self.table)))
        self.pattern = re.compile("|".join(f"(?:{a})" for a in alts)) if alts else None

    def _sub(self, m: re.Match) -> str:
        s = m.group()
        return self.table.get(s, s)

    def __call__(self, text: str) -> str:
        if self.pattern is None:
            return text
        return self.pattern.sub(self._sub, text)


# --- building the pipeline ------------------------------------------------------------------


@dataclass
class Built:
    hf: HFTokenizer
    token_bytes: list[bytes]
    first_bytes: dict[int, bytes]
    special_tokens: dict[str, int]
    normalize: CharsmapNormalizer | None
    unk_id: int | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    pieces: list[str]


def _whitespace_normalizers(m: SentencePieceModel) -> list:
    steps = []
    if m.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if m.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    if m.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
        if m.remove_extra_whitespaces:
            steps.append(normalizers.Replace(Regex(SPACE + r"+\z"), ""))
    return steps


def piece_bytes(piece: Piece, unk_surface: str) -> bytes:
    if piece.type == BYTE:
        match = _BYTE_PIECE.fullmatch(piece.piece)
        if match:
            return bytes([int(match.group(1), 16)])
    if piece.type == UNKNOWN:
        return unk_surface.encode("utf-8")
    if piece.type == CONTROL:
        return piece.piece.encode("utf-8")
    return piece.piece.replace(SPACE, " ").encode("utf-8")


def build(m: SentencePieceModel) -> Built:
    """A `tokenizers` pipeline and decode tables for a SentencePiece model."""
    if m.model_type not in (UNIGRAM, BPE):
        raise TokenizerError(f"SentencePiece model type {m.model_type} (WORD/CHAR) is not supported")
    if m.treat_whitespace_as_suffix:
        raise TokenizerError("SentencePiece models with treat_whitespace_as_suffix are not supported")
    pieces = m.pieces
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    table = charsmap_table(m.charsmap) if m.charsmap else {}
    normalize = CharsmapNormalizer(table, user_defined) if table else None

    unk_id = next((i for i, p in enumerate(pieces) if p.type == UNKNOWN), None)
    if m.model_type == BPE:
        hf = _build_bpe(m, unk_id)
    else:
        hf = _build_unigram(m, unk_id)
    norm_steps = _whitespace_normalizers(m)
    hf.normalizer = normalizers.Sequence(norm_steps) if norm_steps else None
    hf.pre_tokenizer = None
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])

    token_bytes = [piece_bytes(p, m.unk_surface) for p in pieces]
    first_bytes = {}
    if m.add_dummy_prefix or m.remove_extra_whitespaces:
        for i, p in enumerate(pieces):
            if p.type in (NORMAL, USER_DEFINED, UNUSED) and p.piece.startswith(SPACE):
                first_bytes[i] = token_bytes[i][1:]
    specials = {p.piece: i for i, p in enumerate(pieces) if p.type in (CONTROL, UNKNOWN)}

    def valid(i: int) -> int | None:
        return i if 0 <= i < len(pieces) else None

    return Built(
        hf=hf,
        token_bytes=token_bytes,
        first_bytes=first_bytes,
        special_tokens=specials,
        normalize=normalize,
        unk_id=unk_id,
        bos_id=valid(m.bos_id),
        eos_id=valid(m.eos_id),
        pad_id=valid(m.pad_id),
        pieces=[p.piece for p in pieces],
    )


def _build_bpe(m: SentencePieceModel, unk_id: int | None) -> HFTokenizer:
    vocab = {}
    for i, p in enumerate(m.pieces):
        vocab.setdefault(p.piece, i)
    mergeable = {p.piece: p.score for p in m.pieces if p.type == NORMAL}
    merges = merges_by_priority(mergeable)
    unk = m.pieces[unk_id].piece if unk_id is not None else None
    model = models.BPE(
        vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=m.byte_fallback
    )
    hf = HFTokenizer(model)
    user = [AddedToken(p.piece, special=False, normalized=True) for p in m.pieces if p.type == USER_DEFINED]
    if user:
        hf.add_tokens(user)
    return hf


def _build_unigram(m: SentencePieceModel, unk_id: int | None) -> HFTokenizer:
    normal_scores = [p.score for p in m.pieces if p.type == NORMAL]
    max_score = max(normal_scores, default=0.0)
    vocab = []
    for i, p in enumerate(m.pieces):
        if p.type == NORMAL:
            vocab.append((p.piece, p.score))
        elif p.type == USER_DEFINED:
            # SentencePiece's Viterbi scores user-defined pieces as length * max_score - 0.1.
            vocab.append((p.piece, len(p.piece) * max_score - 0.1))
        else:
            # Reserved pieces: a name with a plain space never occurs in escaped text.
            vocab.append((f" {p.type} {i} {p.piece}", 0.0))
    if m.byte_fallback:
        raise TokenizerError("SentencePiece Unigram with byte fallback is not supported")
    model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=False)
    return HFTokenizer(model)
