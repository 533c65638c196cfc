"""The C SentencePiece encoder (llmfn.tokenization.native_spm), Unigram and BPE, gives exactly
`sentencepiece`'s EncodeAsIds: hypothesis over mixed text (LLMFN_TOKENIZER_EXAMPLES, default 1000),
batches, targeted cases, a 1 MB string, and small hand-made models whose scores exercise the
float arithmetic (Unigram: ties, rebasing of large scores, user-defined pieces; BPE: score ties,
UNUSED pieces split back, merges across the space symbol, user-defined and unknown symbols)."""

from __future__ import annotations

import io
import math
import struct

import pytest
import sentencepiece
from hypothesis import given
from hypothesis import strategies as st

import fixtures_tokenizers as fx
from llmfn.tokenization import native_spm
from llmfn.tokenization.sentencepiece_model import BPE, parse_model_proto, read_model
from test_tokenizer import ENCODE, PROPERTY, SPM_SPECIALS, WORDS, texts

pytestmark = pytest.mark.skipif(native_spm.library() is None, reason="no C compiler")

UD_SYMBOLS = ["<extra_id_0>", "the", "ing", "▁of", "ab"]


def _train_unigram_with_extras(folder) -> str:
    """A Unigram model with byte fallback, common words as user-defined pieces and low character
    coverage (so some characters are unknown)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(fx.corpus_lines()), model_writer=model, model_type="unigram", vocab_size=1500,
        byte_fallback=True, user_defined_symbols=UD_SYMBOLS, character_coverage=0.98,
        normalization_rule_name="nmt_nfkc", num_threads=2, minloglevel=2, max_sentence_length=100000,
    )  # fmt: skip
    path = folder / "unigram_extras.model"
    path.write_bytes(model.getvalue())
    return str(path)


def _train_bpe_with_extras(folder) -> str:
    """A BPE model with nmt_nfkc, the default whitespace handling (extra spaces removed), no byte
    fallback, low character coverage (unknown characters) and user-defined pieces that compete
    with vocabulary words."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(fx.corpus_lines()), model_writer=model, model_type="bpe", vocab_size=1200,
        user_defined_symbols=UD_SYMBOLS, character_coverage=0.98, normalization_rule_name="nmt_nfkc",
        num_threads=2, minloglevel=2, max_sentence_length=100000,
    )  # fmt: skip
    path = folder / "bpe_extras.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("native_spm")


@pytest.fixture(scope="module")
def t5_like(workdir):
    path = fx.train_sentencepiece(workdir, "unigram")
    native = native_spm.NativeSentencePiece.build(read_model(path))
    assert native is not None
    return native, sentencepiece.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def extras(workdir):
    path = _train_unigram_with_extras(workdir)
    m = read_model(path)
    assert m.byte_fallback and sum(p.type == 4 for p in m.pieces) == len(UD_SYMBOLS)
    native = native_spm.NativeSentencePiece.build(m)
    assert native is not None
    return native, sentencepiece.SentencePieceProcessor(model_file=path)


@pytest.fixture(scope="module")
def llama_like(workdir):
    m = read_model(fx.train_sentencepiece(workdir, "bpe"))
    assert m.model_type == BPE and m.byte_fallback and not m.remove_extra_whitespaces
    native = native_spm.NativeSentencePiece.build(m)
    assert native is not None
    return native, sentencepiece.SentencePieceProcessor(model_file=str(workdir / "bpe.model"))


@pytest.fixture(scope="module")
def bpe_extras(workdir):
    path = _train_bpe_with_extras(workdir)
    m = read_model(path)
    assert m.model_type == BPE and not m.byte_fallback and m.remove_extra_whitespaces
    assert sum(p.type == 4 for p in m.pieces) == len(UD_SYMBOLS)
    native = native_spm.NativeSentencePiece.build(m)
    assert native is not None
    return native, sentencepiece.SentencePieceProcessor(model_file=path)


MODELS = ["t5_like", "extras", "llama_like", "bpe_extras"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def models(t5_like, extras, llama_like, bpe_extras):
    return [t5_like, extras, llama_like, bpe_extras]


SPECIALS = SPM_SPECIALS + UD_SYMBOLS + ["[[ud]]", "▁the", "thing", "theing"]


@ENCODE
@given(texts(SPECIALS, WORDS))
def test_encodes_as_sentencepiece(models, text):
    for native, ref in models:
        assert native.encode(text) == ref.EncodeAsIds(text)


@PROPERTY
@given(st.lists(texts(SPECIALS, WORDS) | st.just(""), max_size=12))
def test_batch_equals_single(models, batch):
    for native, ref in models:
        assert native.encode_batch(batch) == [ref.EncodeAsIds(t) for t in batch]


TARGETED = [
    "",
    " ",
    "      ",
    "\u3000\t\n ",
    "a" + " " * 50 + "b" + "\t" * 20 + "c   ",
    "ｱｲｳ ①②③ ﬁﬂ ＡＢＣ ½ Ⅳ ㍻",
    "e\u0301\u0323 \u1e9b\u0323 a\u0308\u0304b \u3099\u304b\u3099 Å\u030a",
    "unknown: ☃★♞ ᚠᛇᚻ ꧁꧂ 𓀀𓁐 \U0010fffd \x00\x01\x7f",
    "☃☃☃ ☃x☃",  # runs of unknown characters merge into one id (or bytes with byte fallback)
    "<extra_id_0>the<extra_id_0> thing of ab abab xtheing",
    "<sep>[[ud]]<sep> x<sep>y [[ud]][[ud ]]",
    "😀🎉 👩‍💻 漢字かな交じり文 한국어 \U0001f9ea",  # byte fallback (or unknown) for rare characters
    "▁ ▁▁ a▁ ▁b",
    "▁▁▁▁x  ▁  ▁\t▁",
    "2024-01-31 12345678901234567890 3.14159",
    "# " + "=" * 27,
    "# " + "=" * 37,
    "reversed(defaults)))))",
]


@pytest.mark.parametrize("text", TARGETED)
def test_targeted(model, text):
    native, ref = model
    assert native.encode(text) == ref.EncodeAsIds(text)


def test_unknown_characters_are_exercised(t5_like, extras, llama_like, bpe_extras):
    """The targeted unknown text really holds unknown pieces (merged) and byte pieces."""
    text = "☃☃☃ ☃x☃"
    for native, ref in (t5_like, bpe_extras):
        assert ref.unk_id() in native.encode(text)
    for native, ref in (extras, llama_like):
        assert any(ref.is_byte(i) for i in native.encode(text))


def test_long_words(model):
    """Words longer than the C encoder's scanned segments (48 symbols) go through its agenda."""
    native, ref = model
    text = fx.corpus_text()[:20000]
    for t in (text.replace(" ", ""), "ab" * 500, "x" * 1000 + " " + "the" * 100, "漢字" * 300):
        assert native.encode(t) == ref.EncodeAsIds(t)


def test_one_megabyte_string(model):
    native, ref = model
    base = fx.corpus_text()
    n = 1_000_000
    text = (base * (n // len(base.encode()) + 1))[:n]
    assert native.encode(text) == ref.EncodeAsIds(text)
    lines = text.split("\n")
    assert native.encode_batch(lines) == ref.encode(lines)


def test_threads_share_one_encoder(model):
    """The server encodes from many threads at once (ctypes releases the GIL): one encoder, four
    threads, single and batch calls, each gets sentencepiece's ids."""
    native, ref = model
    lines = fx.corpus_lines()[:2000]
    want = ref.encode(lines)
    assert fx.encode_in_threads(native, lines) == [want] * 4


# --- hand-made models: the arithmetic ----------------------------------------------------------


def _proto(
    pieces: list[tuple[str, float, int]], model_type: int = 1, byte_fallback: bool = False, **normalizer
) -> bytes:
    """A minimal ModelProto: pieces (text, score, type), Unigram (1) or BPE (2), an identity
    normalizer."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def field(num: int, wire: int, value) -> bytes:
        key = varint(num << 3 | wire)
        if wire == 0:
            return key + varint(value)
        if wire == 5:
            return key + value
        return key + varint(len(value)) + value

    out = b""
    for text, score, kind in pieces:
        out += field(
            1, 2, field(1, 2, text.encode()) + field(2, 5, struct.pack("<f", score)) + field(3, 0, kind)
        )
    out += field(2, 2, field(3, 0, model_type) + field(35, 0, int(byte_fallback)))
    spec = {"add_dummy_prefix": False, "remove_extra_whitespaces": False, **normalizer}
    out += field(3, 2, field(1, 2, b"identity") + field(3, 0, int(spec["add_dummy_prefix"]))
                 + field(4, 0, int(spec["remove_extra_whitespaces"])))  # fmt: skip
    return out


SCORES = st.floats(-8.0, 0.5, width=32) | st.floats(-3e6, -1e4, width=32)


@PROPERTY
@given(
    scores=st.lists(SCORES, min_size=7, max_size=7),
    user_defined=st.sets(st.sampled_from(["yy", "yyy", "xy"]), max_size=2),
    text=st.text(alphabet="xyz", max_size=40),
)
def test_hand_made_models_match_sentencepiece(scores, user_defined, text):
    """Near-ties between permutations of pieces and scores large enough to be rebased: float
    rounding decides these, so only the exact arithmetic of sentencepiece gives its ids."""
    names = ["x", "y", "yy", "yyy", "xy", "yx", "xyy"]
    pieces = [("<unk>", 0.0, 2)] + [
        (p, s, 4 if p in user_defined else 1) for p, s in zip(names, scores, strict=True)
    ]
    blob = _proto(pieces)
    ref = sentencepiece.SentencePieceProcessor(model_proto=blob)
    native = native_spm.NativeSentencePiece.build(parse_model_proto(blob))
    assert native is not None
    assert native.encode(text) == ref.EncodeAsIds(text)
    long = text * 50 + "x" * 300
    assert native.encode(long) == ref.EncodeAsIds(long)


# Pieces whose merges compete: "▁" and "x▁" let merges cross the space symbol (then the text is
# merged as one sequence), UNUSED ones are split back into their last pair.
BPE_PIECES = ["x", "y", "z", "▁", "xy", "yx", "yy", "xx", "xyy", "yyx", "xxy", "yxy", "▁x", "x▁", "▁▁", "▁y"]
BPE_SCORES = st.sampled_from([0.0, -0.0, -1.0, -2.0, -2.5]) | st.floats(-4.0, 0.5, width=32)


@PROPERTY
@given(
    chosen=st.lists(st.tuples(st.sampled_from(BPE_PIECES), BPE_SCORES, st.sampled_from([1, 1, 1, 4, 5])),
                    unique_by=lambda p: p[0], max_size=len(BPE_PIECES)),
    byte_fallback=st.booleans(),
    text=st.text(alphabet="xyz ", max_size=40),
)  # fmt: skip
def test_hand_made_bpe_models_match_sentencepiece(chosen, byte_fallback, text):
    """Score ties (leftmost first), UNUSED pieces resegmented, user-defined pieces frozen,
    characters missing from the vocabulary, merges across words or not."""
    pieces = [("<unk>", 0.0, 2)] + chosen
    if byte_fallback:
        pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    blob = _proto(pieces, model_type=2, byte_fallback=byte_fallback)
    ref = sentencepiece.SentencePieceProcessor(model_proto=blob)
    native = native_spm.NativeSentencePiece.build(parse_model_proto(blob))
    assert native is not None
    assert native.encode(text) == ref.EncodeAsIds(text)
    long = text * 20 + "x" * 60 + "y" * 100
    assert native.encode(long) == ref.EncodeAsIds(long)
    assert native.encode_batch([text, long]) == [ref.EncodeAsIds(text), ref.EncodeAsIds(long)]


@pytest.mark.parametrize(
    "pieces, text",
    [
        # "xyy" is UNUSED: formed by merging, then split back into the parts of its last pair
        ([("x", -1, 1), ("y", -1, 1), ("xy", -1, 1), ("yy", -2, 1), ("xyy", -0.5, 5)], "xyy xyy yxyy"),
        # equal scores: the leftmost pair merges first ("xx" + "x", not "x" + "xx")
        ([("x", -1, 1), ("xx", -1, 1), ("xxx", -1, 1), ("y", -1, 1), ("xy", -1, 1)], "xxxy xxxxy"),
        # sentencepiece 0.2.3 ranks -0.0 below 0.0 (its published source would tie them)
        ([("x", -1, 1), ("y", -1, 1), ("xx", -0.0, 1), ("xy", 0.0, 1)], "xxy xxxy"),
        ([("x", -1, 1), ("y", -1, 1), ("xx", 0.0, 1), ("xy", -0.0, 1)], "xxy xxxy"),
        # an UNUSED piece of one character encodes as unknown (the source would keep its id)
        ([("x", -1, 5), ("y", -1, 1), ("xy", -1, 1)], "x xx yxy"),
        # "x▁" merges across the space symbol, so words cannot be merged one at a time
        ([("x", -1, 1), ("▁", -1, 1), ("▁x", -2, 1), ("x▁", -1, 1), ("y", -1, 1)], "x x xx  xy"),
        # the last pair forming the UNUSED "xyy" decides its split, wherever it occurred
        ([("x", -1, 1), ("y", -1, 1), ("xy", -1, 1), ("yy", -1, 1), ("xyy", 0, 5)], "xyy" + "x" * 50 + "yy"),
    ],
)
def test_hand_made_bpe_cases(pieces, text):
    blob = _proto([("<unk>", 0.0, 2), *pieces], model_type=2)
    ref = sentencepiece.SentencePieceProcessor(model_proto=blob)
    native = native_spm.NativeSentencePiece.build(parse_model_proto(blob))
    assert native is not None
    assert native.encode(text) == ref.EncodeAsIds(text)


def test_unsupported_models_give_none():
    m = parse_model_proto(_proto([("<unk>", 0.0, 2), ("a", -1.0, 1)], model_type=2))
    assert native_spm.NativeSentencePiece.build(m) is not None
    m.pieces[1].score = math.nan
    assert native_spm.NativeSentencePiece.build(m) is None
    reserved_char = parse_model_proto(
        _proto([("<unk>", 0.0, 2), ("a", -1.0, 1), ("b", 0.0, 3)], model_type=2)
    )
    assert native_spm.NativeSentencePiece.build(reserved_char) is None
    m = parse_model_proto(_proto([("<unk>", 0.0, 2), ("a", -1.0, 1)]))
    assert native_spm.NativeSentencePiece.build(m) is not None
    m.treat_whitespace_as_suffix = True
    assert native_spm.NativeSentencePiece.build(m) is None
    no_unknown = parse_model_proto(_proto([("a", -1.0, 1)]))
    assert native_spm.NativeSentencePiece.build(no_unknown) is None
