"""Decode tables for a `tokenizers` pipeline: each token's bytes, read off its decoder.

llmfn decodes by joining token bytes and decoding UTF-8 once, which is what makes streaming
exact. The table follows the decoder the tokenizer.json names: ByteLevel (GPT-2 alphabet),
Metaspace / Replace("▁", " ") + ByteFallback + Fuse + Strip (SentencePiece style), WordPiece
("##" joins, other tokens get a space before them) and BPEDecoder (end-of-word suffix). The
first token of a sequence may differ ("first bytes"): the SentencePiece dummy-prefix space and
WordPiece's leading space are dropped there. Of WordPiece's `cleanup`, the part that depends on
one token only is applied (no space before ".", "?", "!", ","); the rest (" ' " -> "'", " n't",
" do not" -> " don't", ...) depends on the next token and is not.
"""

from __future__ import annotations

import json
import re

from tokenizers import Tokenizer as HFTokenizer

from llmfn.tokenization.byte_level import from_byte_chars

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def hf_special_tokens(hf: HFTokenizer) -> dict[str, int]:
    return {tok.content: i for i, tok in hf.get_added_tokens_decoder().items() if tok.special}


def _steps(decoder: dict | None) -> list[dict]:
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return [s for d in decoder.get("decoders", []) for s in _steps(d)]
    return [decoder]


def hf_decode_tables(hf: HFTokenizer) -> tuple[list[bytes], dict[int, bytes]]:
    """(bytes of every id, bytes of the ids whose form differs at the start of a sequence)."""
    spec = json.loads(hf.to_str())
    steps = _steps(spec.get("decoder"))
    size = hf.get_vocab_size(with_added_tokens=True)
    tokens = [hf.id_to_token(i) for i in range(size)]
    while tokens and tokens[-1] is None:
        tokens.pop()
    table: list[bytes] = []
    first: dict[int, bytes] = {}
    join_with_space = not steps  # `tokenizers` joins tokens with spaces when there is no decoder
    for i, tok in enumerate(tokens):
        if tok is None:
            table.append(b"")
            continue
        mid, start = _token_forms(tok, steps, join_with_space)
        table.append(mid)
        if start != mid:
            first[i] = start
    return table, first


def _token_forms(tok: str, steps: list[dict], join_with_space: bool) -> tuple[bytes, bytes]:
    value: str | bytes = tok
    strip_first = 0
    fused = False
    for step in steps:
        kind = step.get("type")
        if isinstance(value, bytes):
            break
        if kind == "ByteLevel":
            raw = from_byte_chars(value)
            value = raw if raw is not None else value.encode("utf-8")
        elif kind == "Metaspace":
            value = value.replace(step.get("replacement", "\u2581"), " ")
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            if scheme != "never":
                strip_first = 1
        elif kind == "Replace":
            pattern = step.get("pattern", {})
            if "String" in pattern:
                value = value.replace(pattern["String"], step.get("content", ""))
            elif "Regex" in pattern:
                value = re.sub(pattern["Regex"], step.get("content", ""), value)
        elif kind == "ByteFallback":
            m = _BYTE_PIECE.fullmatch(value)
            if m:
                value = bytes([int(m.group(1), 16)])
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip":
            n, content = int(step.get("start", 0)), step.get("content", " ")
            if fused:
                strip_first = max(strip_first, n)
            else:
                while n and value.startswith(content):
                    value, n = value[len(content) :], n - 1
        elif kind == "WordPiece":
            prefix = step.get("prefix", "##")
            if value.startswith(prefix):
                value = value[len(prefix) :]
            elif not (step.get("cleanup", True) and value in (".", "?", "!", ",")):
                value = " " + value
            strip_first = 1
        elif kind == "BPEDecoder":
            value = value.replace(step.get("suffix", "</w>"), " ")
    if isinstance(value, str) and join_with_space:
        value = " " + value
        strip_first = 1
    mid = value if isinstance(value, bytes) else value.encode("utf-8")
    start = mid
    if strip_first and isinstance(value, str):
        k = 0
        while k < strip_first and start.startswith(b" "):
            start, k = start[1:], k + 1
    return mid, start
