"""SentencePiece Unigram and BPE encoding in C (kernels/csrc/spm.c): the same ids as `sentencepiece`'s
EncodeAsIds (no BOS/EOS), several times faster than `tokenizers` and `sentencepiece`, for one string or a
batch (OpenMP over texts).

It ports sentencepiece's own steps, in its order and with its arithmetic:
- normalizer.cc: at each position a user-defined piece (longest, kept as is), else the longest
  entry of the precompiled character map (a darts-clone double array over UTF-8 bytes whose values
  index NUL-terminated replacements), else the character; leading spaces dropped, a space after a
  space dropped, the dummy "▁" prefix, " " escaped as "▁", trailing "▁" dropped;
- unigram_model.cc, EncodeOptimized, as the sentencepiece 0.2.3 wheel computes it (read from its
  machine code: it differs from older sources): Viterbi over UTF-8 byte positions with float
  scores; pieces matched by a trie (NORMAL and USER_DEFINED; UNUSED, CONTROL, UNKNOWN and BYTE
  never); a user-defined piece scores 0.1 * (bytes - 1); a character no single piece covers gets an
  unknown node of score min_score - 10; a candidate replaces the best path ending at a position
  only if it scores strictly higher (the earliest start wins ties); scores are rebased when they
  leave [-1e5, 1e5];
- bpe_model.cc, SampleEncode without dropout, as the 0.2.3 wheel computes it: characters (a
  user-defined piece is one frozen symbol) merged pairwise, highest score first (scores in the IEEE
  total order: -0.0 ranks below 0.0), leftmost on ties; pieces NORMAL, USER_DEFINED and UNUSED,
  an UNUSED one split back into the parts of the last pair that formed it, and one left whole
  (a single character) encoded as unknown. Merges never cross a user-defined piece, nor (when no
  piece holds a character then "▁") the start of a word, so words merge one at a time;
- sentencepiece_processor.cc: consecutive unknown pieces merge into one unknown id, or with byte
  fallback each unknown piece becomes the <0xXX> pieces of its UTF-8 bytes.

`NativeSentencePiece.build` returns None for what is not ported (WORD and CHAR models,
treat_whitespace_as_suffix, BPE models with NaN scores or with a control/unknown/byte piece that is
one character or also a normal piece, models sentencepiece itself refuses to load) or without a C
compiler.
"""

from __future__ import annotations

import ctypes
import math
import re
import struct
import sys
import weakref
from collections.abc import Sequence

import numpy as np

from llmfn import cbuild
from llmfn.tokenization.native_io import split_ids, utf8, utf8_joined
from llmfn.tokenization.sentencepiece_model import (
    BPE,
    BYTE,
    CONTROL,
    NORMAL,
    UNIGRAM,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    SentencePieceModel,
)

_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_SIGNATURES = {
    "spm_create": [_p, _p, _p, _p, _i32, _p, _i64, _p, _i32, _i32, _i32, _i32, _i32, _p],
    "spm_free": [_p],
    "spm_encode": [_p, _p, _i64, _p, _i64, _p],
    "spm_encode_batch": [_p, _p, _p, _i64, _p, _p],
    "spm_batch_take": [_p, _p, _i64, _p],
}

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_lib: ctypes.CDLL | None | bool = False  # False until the first library() call


def library() -> ctypes.CDLL | None:
    """The compiled encoder (built on first use by llmfn.cbuild), or None without a C compiler."""
    global _lib
    if _lib is False:
        _lib = cbuild.load("llmfn_spm", "spm.c", _SIGNATURES)
    return _lib


def unsupported(m: SentencePieceModel) -> str | None:
    """Why the C encoder cannot encode m exactly as sentencepiece does, or None when it can."""
    if m.model_type not in (UNIGRAM, BPE):
        return f"model type {m.model_type} (only Unigram and BPE are native)"
    if m.treat_whitespace_as_suffix:
        return "treat_whitespace_as_suffix"
    if sys.byteorder != "little":
        return "the character map is read as little-endian"
    # What sentencepiece refuses to load (model_interface.cc InitializePieces).
    if sum(p.type == UNKNOWN for p in m.pieces) != 1:
        return "not exactly one unknown piece"
    if any(not p.piece or "\0" in p.piece for p in m.pieces):
        return "an empty piece or one holding NUL"
    matched = [p.piece for p in m.pieces if p.type in (NORMAL, USER_DEFINED, UNUSED)]
    reserved = [p.piece for p in m.pieces if p.type not in (NORMAL, USER_DEFINED, UNUSED)]
    matched_set = set(matched)
    if len(matched_set) != len(matched) or len(set(reserved)) != len(reserved):
        return "duplicate pieces"
    if any(p.type not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) for p in m.pieces):
        return "an unknown piece type"
    if _byte_ids(m) is None and (m.byte_fallback or any(p.type == BYTE for p in m.pieces)):
        return "byte pieces without byte_fallback, or byte_fallback without the 256 byte pieces"
    if m.model_type == BPE:
        if any(math.isnan(p.score) for p in m.pieces):
            return "a NaN score (sentencepiece's agenda order is then undefined)"
        # sentencepiece looks a BPE symbol up among the reserved pieces first: the C encoder
        # assumes no symbol (a character or a mergeable piece) is one.
        if any(len(r) == 1 or r in matched_set for r in reserved):
            return "a reserved piece that is one character or also a normal piece"
    blob = m.charsmap
    if blob and (len(blob) <= 4 or struct.unpack("<I", blob[:4])[0] >= len(blob)):
        return "a broken character map"
    return None


def _byte_ids(m: SentencePieceModel) -> list[int] | None:
    """The id of the <0xXX> piece of each byte when byte fallback has all 256, else None."""
    if not m.byte_fallback:
        return None
    ids: dict[int, int] = {}
    for i, p in enumerate(m.pieces):
        match = _BYTE_PIECE.fullmatch(p.piece) if p.type == BYTE else None
        if p.type == BYTE and match is None:
            return None
        if match:
            ids.setdefault(int(match.group(1), 16), i)
    return [ids[b] for b in range(256)] if len(ids) == 256 else None


class NativeSentencePiece:
    """A SentencePiece Unigram or BPE model compiled into the C encoder's tables."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p):
        self._lib = lib
        self._handle = handle
        weakref.finalize(self, lib.spm_free, handle)

    @classmethod
    def build(cls, m: SentencePieceModel) -> NativeSentencePiece | None:
        """None when the C library cannot be built here or the model uses a feature not
        implemented natively (the caller then keeps its tokenizers path)."""
        if unsupported(m) is not None:
            return None
        lib = library()
        if lib is None:
            return None
        encoded = [p.piece.encode("utf-8") for p in m.pieces]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        scores = np.array([p.score for p in m.pieces], dtype=np.float32)
        types = np.array([p.type for p in m.pieces], dtype=np.int32)
        byte_ids = _byte_ids(m)
        byte_arr = None if byte_ids is None else np.array(byte_ids, dtype=np.int32)
        unk_id = next(i for i, p in enumerate(m.pieces) if p.type == UNKNOWN)
        handle = ctypes.c_void_p()
        rc = lib.spm_create(
            b"".join(encoded), offsets.ctypes.data, scores.ctypes.data, types.ctypes.data, len(encoded),
            m.charsmap, len(m.charsmap), None if byte_arr is None else byte_arr.ctypes.data, unk_id,
            int(m.add_dummy_prefix), int(m.remove_extra_whitespaces), int(m.escape_whitespaces),
            int(m.model_type == BPE), ctypes.byref(handle),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("out of memory building the SentencePiece tables")
        return cls(lib, handle)

    def encode(self, text: str) -> list[int]:
        """sentencepiece's EncodeAsIds(text): no BOS or EOS."""
        data = utf8(text)
        # Usually fewer ids than input bytes; a text whose normalization expands retries once.
        out = np.empty(len(data) + 8, dtype=np.int32)
        count = ctypes.c_int64()
        rc = self._lib.spm_encode(
            self._handle, data, len(data), out.ctypes.data, len(out), ctypes.byref(count)
        )
        if rc == 1:
            out = np.empty(count.value, dtype=np.int32)
            rc = self._lib.spm_encode(
                self._handle, data, len(data), out.ctypes.data, len(out), ctypes.byref(count)
            )
        if rc != 0:
            raise MemoryError("out of memory encoding text")
        return out[: count.value].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each text, in order, encoded in parallel (OpenMP, all cores)."""
        n = len(texts)
        if n == 0:
            return []
        data, offsets = utf8_joined(texts)
        counts = np.zeros(n, dtype=np.int64)
        results = ctypes.c_void_p()
        if self._lib.spm_encode_batch(
            self._handle, data, offsets.ctypes.data, n, counts.ctypes.data, ctypes.byref(results)
        ):
            raise MemoryError("out of memory encoding texts")
        ids = np.empty(int(counts.sum()), dtype=np.int32)
        self._lib.spm_batch_take(results, counts.ctypes.data, n, ids.ctypes.data)
        return split_ids(ids, counts)
