"""GPT-2 byte-level alphabet and BPE merge tables derived from ranks or scores."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to one printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def to_byte_chars(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def from_byte_chars(token: str) -> bytes | None:
    """Bytes of a byte-level token, or None if a character is outside the alphabet."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


def merges_by_priority(pieces: Mapping[str, float]) -> list[tuple[str, str]]:
    """Every merge rule (a, b) with a, b and a+b in `pieces`, best result first.

    `pieces` maps a piece to its priority (higher merges first, as SentencePiece scores; pass
    -rank for rank-ordered vocabularies). SentencePiece, tiktoken and llama.cpp all merge the
    best adjacent pair, leftmost on ties, and accept any split whose halves are pieces;
    `tokenizers` ranks merge rules instead, so each result gets one rule per possible split, all
    next to each other. Within one result, a rule (x, y) goes before (y, z) so that the left
    pair of an overlapping x|y|z wins, as it does by position in the references.
    """
    rules: list[tuple[float, str, int, str, str]] = []
    for piece, score in pieces.items():
        splits = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in pieces and piece[k:] in pieces
        ]
        for order, (a, b) in enumerate(_order_splits(splits)):
            rules.append((-score, piece, order, a, b))
    rules.sort(key=lambda r: r[:3])
    return [(a, b) for *_, a, b in rules]


def _order_splits(splits: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Topological order of one piece's splits: (x, y) before (y, z); cycles keep input order."""
    if len(splits) < 2:
        return splits
    remaining, ordered = list(splits), []
    while remaining:
        ready = [s for s in remaining if not any(o is not s and o[1] == s[0] for o in remaining)]
        pick = ready[0] if ready else remaining[0]
        ordered.append(pick)
        remaining.remove(pick)
    return ordered


def rank_merges(ranks: Mapping[bytes, int]) -> list[tuple[str, str]]:
    """Byte-level merge rules for a tiktoken-style rank table (lower rank merges first)."""
    return merges_by_priority({to_byte_chars(t): -r for t, r in ranks.items()})
