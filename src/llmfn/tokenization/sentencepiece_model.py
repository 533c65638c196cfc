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
- user-defined pieces are kept whole and exempt from normalization (for BPE, llmfn cuts them out of
  the normalized text and encodes the pieces between them; `tokenizers`' added tokens would get
  the dummy prefix themselves).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
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


class CharsmapNormalizer:
    """SentencePiece's character-map normalization: at each position, a user-defined piece if
    one matches (kept as is), else the longest source string of the map, else the character.

    The map is a uint32 trie size, a darts-clone double-array trie over UTF-8 source bytes, then
    the NUL-terminated replacement strings the trie's values point into. Only characters that
    can start a source string (or a user-defined piece) are looked at, so text the map leaves
    alone (plain ASCII letters, most of any text) passes through at regex speed.
    """

    def __init__(self, blob: bytes, protected: list[str]):
        (trie_size,) = struct.unpack("<I", blob[:4])
        units = np.frombuffer(blob[4 : 4 + trie_size], dtype="<u4").astype(np.int64)
        self._strings = blob[4 + trie_size :]
        self._units = units.tolist()
        self._cache: dict[int, str] = {}
        self._protected: dict[str, list[str]] = {}
        for piece in sorted(protected, key=len, reverse=True):
            self._protected.setdefault(piece[0], []).append(piece)
        self._starts, self._astral_starts = _start_pattern(units, {p[0] for p in protected})

    def _value(self, offset: int) -> str:
        text = self._cache.get(offset)
        if text is None:
            end = self._strings.index(b"\0", offset)
            text = self._cache[offset] = self._strings[offset:end].decode("utf-8", errors="replace")
        return text

    def _longest(self, text: str, i: int) -> tuple[int, str]:
        """(characters consumed, replacement) of the longest map entry at text[i:], or (0, "")."""
        units = self._units
        n = len(units)
        node = (units[0] >> 10) << ((units[0] & 512) >> 6)
        best = (0, "")
        for k in range(i, len(text)):
            for byte in text[k].encode("utf-8"):
                node ^= byte
                if node >= n:
                    return best
                unit = units[node]
                if unit & 0x800000FF != byte:
                    return best
                node ^= (unit >> 10) << ((unit & 512) >> 6)
                if unit & 256:
                    best = (k + 1 - i, self._value(units[node] & 0x7FFFFFFF))
        return best

    def __call__(self, text: str) -> str:
        if self._starts is None or self._starts.search(text) is None:
            return text
        out, pos = [], 0
        for m in self._starts.finditer(text):
            i = m.start()
            if i < pos or (m.group() >= "\U00010000" and m.group() not in self._astral_starts):
                continue
            out.append(text[pos:i])
            pos = i
            for piece in self._protected.get(text[i], ()):
                if text.startswith(piece, i):
                    out.append(piece)
                    pos = i + len(piece)
                    break
            else:
                length, value = self._longest(text, i)
                if length:
                    out.append(value)
                    pos = i + length
        out.append(text[pos:])
        return "".join(out)


def _children_chars(units: np.ndarray, base: int) -> list[tuple[str, int, bool]]:
    """(character, node after it, ends an entry) for each character that continues a trie path
    from node `base`."""
    n = len(units)
    labels = units & 0x800000FF
    offsets = (units >> 10) << ((units & 512) >> 6)
    byte_range = np.arange(1, 256, dtype=np.int64)
    found = []
    stack = [(base, b"")]
    while stack:
        node, prefix = stack.pop()
        pos = node ^ byte_range
        ok = pos < n
        pos, chars = pos[ok], byte_range[ok]
        hit = labels[pos] == chars
        for p, c in zip(pos[hit].tolist(), chars[hit].tolist(), strict=True):
            key = prefix + bytes([c])
            child = p ^ int(offsets[p])
            try:
                found.append((key.decode("utf-8"), child, bool(units[p] & 256)))
            except UnicodeDecodeError:
                if len(key) < 4:
                    stack.append((child, key))
    return found


def _start_pattern(units: np.ndarray, protected: set[str]) -> tuple[re.Pattern | None, set[str]]:
    """A regex for positions where a map entry or a protected piece may start: characters that
    are entries themselves, or that begin longer entries and are followed by a second character
    of one (so "e" is looked at only before a combining mark, not before every letter).

    Python's `re` tests a class of BMP characters with a bitmap but walks a list for the rest, so
    characters beyond the BMP match as one range here and are checked against the returned set.
    """
    root = int((units[0] >> 10) << ((units[0] & 512) >> 6))
    always, prefix_only, seconds = set(protected), set(), set()
    for ch, node, is_entry in _children_chars(units, root):
        following = _children_chars(units, node)
        if is_entry:
            always.add(ch)
        elif following:
            prefix_only.add(ch)
        seconds.update(c for c, _, _ in following)
    prefix_only -= always
    astral = "[\U00010000-\U0010ffff]"

    def bmp(chars: set[str]) -> set[str]:
        return {c for c in chars if ord(c) < 0x10000}

    alts = []
    if bmp(always):
        alts.append(_char_class(bmp(always)))
    if bmp(prefix_only) and seconds:
        follow = _char_class(bmp(seconds)) + ("|" + astral if len(bmp(seconds)) < len(seconds) else "")
        alts.append(_char_class(bmp(prefix_only)) + f"(?:(?={follow}))")
    beyond = {c for c in always | prefix_only if ord(c) >= 0x10000}
    if beyond:
        alts.append(astral)
    return (re.compile("|".join(alts)) if alts else None), beyond


def _char_class(chars: set[str]) -> str:
    if not chars:
        return "[^\\s\\S]"
    cps = sorted(map(ord, chars))
    parts, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = re.escape(chr(cps[i])), re.escape(chr(cps[j]))
        parts.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "[" + "".join(parts) + "]"


# --- building the pipeline ------------------------------------------------------------------


@dataclass
class Built:
    hf: HFTokenizer
    token_bytes: list[bytes]
    first_bytes: dict[int, bytes]
    special_tokens: dict[str, int]
    normalize: SpmNormalizer
    unk_id: int | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    pieces: list[str]
    protected: dict[str, int]
    model_only: HFTokenizer


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


_SPACES = re.compile(" {2,}")


class SpmNormalizer:
    """All of SentencePiece's normalization in Python: the character map, then (as configured)
    strip and collapse spaces, the dummy "▁" prefix, spaces as "▁", no trailing "▁"."""

    def __init__(self, m: SentencePieceModel, charsmap: CharsmapNormalizer | None):
        self.charsmap = charsmap
        self.collapse = m.remove_extra_whitespaces
        self.prefix = m.add_dummy_prefix
        self.escape = m.escape_whitespaces

    def __call__(self, text: str) -> str:
        if self.charsmap is not None:
            text = self.charsmap(text)
        if self.collapse:
            text = _SPACES.sub(" ", text).strip(" ")
        if self.prefix and text:
            text = " " + text
        if self.escape:
            text = text.replace(" ", SPACE)
            if self.collapse:
                text = text.rstrip(SPACE)
        return text


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


def build(m: SentencePieceModel, encodes: bool = True) -> Built:
    """A `tokenizers` pipeline and decode tables for a SentencePiece model. encodes=False: a native
    encoder encodes (llmfn.tokenization.native_spm), so the pipeline need not match sentencepiece
    (Unigram with byte fallback, which `tokenizers` does not encode as sentencepiece does)."""
    if m.model_type not in (UNIGRAM, BPE):
        raise TokenizerError(f"SentencePiece model type {m.model_type} (WORD/CHAR) is not supported")
    if m.treat_whitespace_as_suffix:
        raise TokenizerError("SentencePiece models with treat_whitespace_as_suffix are not supported")
    pieces = m.pieces
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    charsmap = CharsmapNormalizer(m.charsmap, user_defined) if len(m.charsmap) > 4 else None

    unk_id = next((i for i, p in enumerate(pieces) if p.type == UNKNOWN), None)
    if m.model_type == BPE:
        hf = _build_bpe(m, unk_id)
    else:
        hf = _build_unigram(m, unk_id, exact=encodes)
    hf.pre_tokenizer = None
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # llmfn encodes with the model alone after normalizing in Python (`SpmNormalizer`); `hf` keeps
    # the same steps as `tokenizers` normalizers so that it is complete on its own.
    model_only = HFTokenizer.from_str(hf.to_str())
    if m.model_type == UNIGRAM and not any(SPACE in p.piece[1:] for p in pieces if p.type == NORMAL):
        # No piece holds "▁" after its start, so Viterbi never crosses one: split there (faster).
        model_only.pre_tokenizer = pre_tokenizers.Split(SPACE, "merged_with_next")
    norm_steps = _whitespace_normalizers(m)
    hf.normalizer = normalizers.Sequence(norm_steps) if norm_steps else None

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
        normalize=SpmNormalizer(m, charsmap),
        unk_id=unk_id,
        bos_id=valid(m.bos_id),
        eos_id=valid(m.eos_id),
        pad_id=valid(m.pad_id),
        pieces=[p.piece for p in pieces],
        # BPE keeps user-defined pieces whole (SentencePiece freezes them); Unigram scores them.
        protected={p.piece: i for i, p in enumerate(pieces) if p.type == USER_DEFINED}
        if m.model_type == BPE
        else {},
        model_only=model_only,
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
    return HFTokenizer(model)


def _build_unigram(m: SentencePieceModel, unk_id: int | None, exact: bool = True) -> HFTokenizer:
    vocab = []
    for i, p in enumerate(m.pieces):
        if p.type == NORMAL:
            vocab.append((p.piece, p.score))
        elif p.type == USER_DEFINED:
            # sentencepiece 0.2's Viterbi scores a user-defined piece 0.1 * (bytes - 1) (older
            # sources: length * max_score - 0.1); see llmfn.tokenization.native_spm.
            vocab.append((p.piece, 0.1 * (len(p.piece.encode("utf-8")) - 1)))
        else:
            # Reserved pieces: a name with a plain space never occurs in escaped text.
            vocab.append((f" {p.type} {i} {p.piece}", 0.0))
    if m.byte_fallback and exact:
        raise TokenizerError(
            "SentencePiece Unigram with byte fallback needs llmfn's native encoder (a C compiler, "
            "LLMFN_NATIVE_TOKENIZERS not 0)"
        )
    model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=m.byte_fallback)
    return HFTokenizer(model)
