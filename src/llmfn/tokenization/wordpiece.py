"""BERT WordPiece from a `vocab.txt`, with lowercasing, accent stripping and Chinese-character
splitting taken from the folder's `tokenizer_config.json` (as transformers' BertTokenizer).

The reference is BERT's own Python tokenizer (transformers' BasicTokenizer + WordpieceTokenizer),
whose character classes come from Python's `unicodedata`; `tokenizers` uses older Unicode tables.
`BertTextFix` closes the gap before the Rust pipeline runs: it removes the characters Python drops
(unassigned and format characters, new combining marks) and spaces out the punctuation and CJK
characters Python splits, for exactly the characters where `tokenizers` would act otherwise. Three
code points remain different (U+166D, which `tokenizers` splits as punctuation, and U+1734 and
U+11938, which it strips as combining marks); ASCII text skips the fix entirely. Python also
lowercases a word-final capital sigma to final sigma, which per-character lowercasing does not.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import cache
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


def _ranges_class(cps: list[int]) -> str:
    parts, i = [], 0
    cps = sorted(cps)
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = re.escape(chr(cps[i])), re.escape(chr(cps[j]))
        parts.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "[" + "".join(parts) + "]"


def _py_is_punctuation(cp: int, cat: str) -> bool:
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or cat.startswith("P")


def _py_is_chinese(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


_SIGMA_WORD = re.compile(r"\S*\u03a3\S*")


class BertTextFix:
    """Make `tokenizers`' BertNormalizer + BertPreTokenizer treat text as Python's BERT does.

    The character classes take about a second to compute (a scan of all code points), so they
    are built on the first non-ASCII text and shared by every tokenizer with the same options."""

    def __init__(self, lowercase: bool, strip_accents: bool, chinese: bool):
        self.options = (lowercase, strip_accents, chinese)

    def __call__(self, text: str) -> str:
        if text.isascii():
            return text
        (remove, remove_astral), (space, space_astral) = _fix_patterns(*self.options)
        if remove is not None:
            text = remove.sub(
                lambda m: "" if m.group() < "\U00010000" or m.group() in remove_astral else m.group(), text
            )
        if space is not None:
            text = space.sub(
                lambda m: (
                    f" {m.group()} " if m.group() < "\U00010000" or m.group() in space_astral else m.group()
                ),
                text,
            )
        if self.options[0] and "\u03a3" in text:
            # Python lowercases a word-final capital sigma to final sigma; `tokenizers` lowercases
            # character by character. Lowercase such words here, as Python's BERT does.
            text = _SIGMA_WORD.sub(lambda m: m.group().lower(), text)
        return text


def bert_text_fix(lowercase: bool, strip_accents: bool, chinese: bool) -> BertTextFix:
    return BertTextFix(lowercase, strip_accents, chinese)


@cache
def _fix_patterns(
    lowercase: bool, strip_accents: bool, chinese: bool
) -> tuple[re.Pattern | None, re.Pattern | None]:
    hf = HFTokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese, strip_accents=strip_accents, lowercase=lowercase
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    remove, split = [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        cat = unicodedata.category(c)
        if cp in (0, 0xFFFD) or (cat[0] == "C" and c not in "\t\n\r"):
            remove.append(cp)
        elif strip_accents and cat == "Mn":
            remove.append(cp)
        elif _py_is_punctuation(cp, cat) or (chinese and _py_is_chinese(cp)):
            split.append(cp)
    # Keep only the characters `tokenizers` does not already treat the same way.
    kept = set(hf.normalizer.normalize_str("".join(map(chr, remove))))
    remove = [cp for cp in remove if chr(cp) in kept]
    probe = "a" + "a".join(map(chr, split)) + "a"
    words = [w for w, _ in hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(probe))]
    joined = {ch for w in words if len(w) > 1 for ch in w if ch != "a"}
    split = [cp for cp in split if chr(cp) in joined]
    return _bmp_and_astral(remove), _bmp_and_astral(split)


def _bmp_and_astral(cps: list[int]) -> tuple[re.Pattern | None, frozenset[str]]:
    """A regex for these characters and the set of those beyond the BMP. Python's `re` tests BMP
    classes with a bitmap but long range lists one by one, so characters beyond the BMP match as
    one range and are checked against the set."""
    bmp = [cp for cp in cps if cp < 0x10000]
    astral = frozenset(chr(cp) for cp in cps if cp >= 0x10000)
    alts = ([_ranges_class(bmp)] if bmp else []) + (["[\U00010000-\U0010ffff]"] if astral else [])
    return (re.compile("|".join(alts)) if alts else None), astral


def build(vocab_file: Path, cfg: dict) -> tuple[HFTokenizer, dict[str, str], BertTextFix]:
    """The pipeline, the special-token roles (role -> token string) found in the vocabulary, and
    the text fix that makes the pipeline agree with Python's BERT tokenizer."""
    vocab = read_vocab(vocab_file)
    roles = {role: _content(cfg.get(role, default)) for role, default in _DEFAULT_SPECIALS.items()}
    roles = {role: tok for role, tok in roles.items() if tok and tok in vocab}
    unk = roles.get("unk_token")
    if unk is None:
        raise TokenizerError(f"{vocab_file}: no unknown token ([UNK]) in the vocabulary")
    lowercase = bool(cfg.get("do_lower_case", True))
    strip = cfg.get("strip_accents")
    strip = lowercase if strip is None else bool(strip)
    chinese = bool(cfg.get("tokenize_chinese_chars", True))
    hf = HFTokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese, strip_accents=strip, lowercase=lowercase
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    hf.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in roles.values()])
    return hf, roles, bert_text_fix(lowercase, strip, chinese)
