"""tiktoken rank files (`*.tiktoken`: one base64 token and its rank per line), read without tiktoken.

A rank file holds no split pattern and no special tokens. The well-known files are recognised by
name and checked by content, with their pattern and specials built in; any other file needs them
from a sidecar JSON file (`<name>.tiktoken.json`, or `tiktoken_config.json` in the same folder)
or from arguments: `{"pattern": "<regex>", "special_tokens": {"<|endoftext|>": 1000}}`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llmfn.errors import TokenizerError
from llmfn.tokenization.byte_level import rank_merges, to_byte_chars

_CL100K = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
_O200K = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_QWEN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class KnownEncoding:
    sha256: str | None
    n_ranks: int
    pattern: str
    special_tokens: dict[str, int]
    eos: str


KNOWN: dict[str, KnownEncoding] = {
    "cl100k_base": KnownEncoding(
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        100256,
        _CL100K,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "<|endoftext|>",
    ),
    "o200k_base": KnownEncoding(
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        199998,
        _O200K,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        "<|endoftext|>",
    ),
    # Qwen-1: specials follow the 151643 ranks.
    "qwen": KnownEncoding(
        None,
        151643,
        _QWEN,
        {
            tok: 151643 + i
            for i, tok in enumerate(
                ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{j}|>" for j in range(205)]
            )
        },
        "<|endoftext|>",
    ),
}


def tiktoken_pattern_for_tokenizers(pattern: str) -> str:
    """Rewrite a tiktoken (Rust regex) pattern for `tokenizers`' Oniguruma.

    Oniguruma reads `X{1,3}+` as `(X{1,3})+` (unbounded) rather than possessive, and `$` as end
    of line rather than end of text: drop the `+` after a counted repeat (the patterns use it
    only for speed) and make `$` `\\z`.
    """
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
        elif c == "$":
            out.append(r"\z")
            i += 1
            continue
        elif c == "{":
            m = re.match(r"\{\d+(?:,\d*)?\}", pattern[i:])
            if m:
                out.append(m.group())
                i += len(m.group())
                if i < len(pattern) and pattern[i] == "+":
                    i += 1
                continue
        out.append(c)
        i += 1
    return "".join(out)


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{n}: expected '<base64 token> <rank>'") from None
    if not ranks:
        raise TokenizerError(f"{path}: empty rank file")
    return ranks


@dataclass
class TiktokenSpec:
    ranks: dict[bytes, int]
    pattern: str
    special_tokens: dict[str, int]
    eos: str | None


def resolve(path: Path, pattern: str | None, special_tokens: dict[str, int] | None) -> TiktokenSpec:
    """The ranks plus pattern and specials: arguments, else sidecar, else the built-in table."""
    data = path.read_bytes()
    ranks = read_ranks(path)
    name = path.name.removesuffix(".tiktoken")
    known = KNOWN.get(name)
    eos = None
    if pattern is None or special_tokens is None:
        sidecar = _sidecar(path)
        if sidecar is not None:
            pattern = pattern if pattern is not None else sidecar.get("pattern")
            if special_tokens is None:
                special_tokens = sidecar.get("special_tokens", {})
            eos = sidecar.get("eos_token")
    if (pattern is None or special_tokens is None) and known is not None:
        ok = len(ranks) == known.n_ranks and max(ranks.values()) == known.n_ranks - 1
        if known.sha256 is not None:
            ok = ok and hashlib.sha256(data).hexdigest() == known.sha256
        if not ok:
            raise TokenizerError(
                f"{path}: named like the {name} encoding but its content differs; "
                "give its pattern and special tokens in a sidecar or as arguments"
            )
        pattern = pattern if pattern is not None else known.pattern
        special_tokens = special_tokens if special_tokens is not None else dict(known.special_tokens)
        eos = known.eos
    if pattern is None:
        raise TokenizerError(
            f"{path}: unknown tiktoken file; give its split pattern and special tokens in "
            f"{path.name}.json or tiktoken_config.json ({{'pattern': ..., 'special_tokens': {{...}}}}) "
            "or as load_tokenizer(..., pattern=..., special_tokens=...)"
        )
    missing = sorted(set(range(256)) - {t[0] for t in ranks if len(t) == 1})
    if missing:
        raise TokenizerError(
            f"{path}: bytes {', '.join(f'0x{b:02X}' for b in missing[:16])}{'...' if len(missing) > 16 else ''} "
            "have no rank; tiktoken cannot encode text containing them (it panics), so llmfn refuses the file"
        )
    return TiktokenSpec(ranks, pattern, dict(special_tokens or {}), eos)


def _sidecar(path: Path) -> dict | None:
    for candidate in (path.with_name(path.name + ".json"), path.parent / "tiktoken_config.json"):
        if candidate.is_file():
            try:
                cfg = json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{candidate}: invalid JSON ({e})") from None
            if "special_tokens" in cfg:
                cfg["special_tokens"] = {str(k): int(v) for k, v in cfg["special_tokens"].items()}
            return cfg
    return None


def build_hf(spec: TiktokenSpec) -> HFTokenizer:
    vocab = {to_byte_chars(t): r for t, r in spec.ranks.items()}
    model = models.BPE(vocab=vocab, merges=rank_merges(spec.ranks), ignore_merges=True)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # tiktoken keeps the matches only, as Split(invert=True, "removed") does.
            pre_tokenizers.Split(
                Regex(tiktoken_pattern_for_tokenizers(spec.pattern)), "removed", invert=True
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    return hf
