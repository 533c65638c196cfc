"""A native encoder for tiktoken-format BPE (cl100k_base, o200k_base, Qwen-1's qwen.tiktoken and
GPT-2's r50k/p50k pattern): the same ids as tiktoken's `encode_ordinary`, faster, with an OpenMP
batch call.

Two parts in C (kernels/csrc/bpe.c, built once per machine by llmfn.cbuild):

- A pre-tokenizer per split pattern, hand-written rather than run by a regex engine: each pattern
  is a fixed alternation, so its matcher tries the alternatives in order at each position, with the
  leftmost-first backtracking semantics of Rust's `fancy-regex`, which tiktoken runs (where a
  greedy repeat gives characters back, the C code does too: see `o200k_word`).
- tiktoken's `byte_pair_encode`: a piece that is a token is that token; otherwise merge, from
  single bytes, the adjacent pair whose concatenation has the lowest rank (leftmost on ties) until
  no pair is a token. Short pieces use tiktoken's own quadratic loop, long ones a heap, which
  merges in the same order.

Unicode classes: tiktoken's Rust regex carries newer Unicode tables than Python's `unicodedata`
(3.11 has Unicode 14.0 and lacks about 9,300 letters and 120 numbers that tiktoken 0.14 knows; its
`str.isspace` also counts U+001C..U+001F, which `\\s` (White_Space) does not). So the class of every
code point is data here, `_CLASS_RUNS`, read from tiktoken itself (`python tests/test_native_bpe.py`
prints it), and tests/test_native_bpe.py checks it against the installed tiktoken for every code
point: the split never depends on which Python runs.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence

import numpy as np

from llmfn import cbuild
from llmfn.errors import TokenizerError
from llmfn.tokenization.native_io import split_ids, utf8, utf8_joined
from llmfn.tokenization.tiktoken_file import KNOWN

# tiktoken's r50k_base / p50k_base pattern (GPT-2), as tiktoken writes it and as GPT-2 did.
R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
R50K_GPT2 = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Pattern -> the C matcher's number (PAT_* in csrc/bpe.c).
PATTERNS: dict[str, int] = {
    KNOWN["cl100k_base"].pattern: 0,
    KNOWN["o200k_base"].pattern: 1,
    KNOWN["qwen"].pattern: 2,
    R50K: 3,
    R50K_GPT2: 3,
}

# The Unicode class of every code point as tiktoken's regex sees it, run-length coded: a class
# letter, then the run's length in base 36 (digits and lower-case letters). U: Lu, L: Ll, T: Lt,
# M: Lm, O: Lo, K: M (marks), N: N, S: White_Space (\s), '.': none of these.
_CLASS_RUNS = (
    ".9S5.iS1.fNa.7Uq.6Lq.aS1.qS1.9O1.7N2.1L1.3N1O1.1N3.1Un.1U7Lo.1L8U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L2U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L2U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U2L1U1L1U1L3U2L1U1L1U2L1U3L2U4L1U2L1U3L3U2L1U2L1U1L1U1L1U2L1U1L2U1L1U2L1U3L1U1L1U2L2"
    "O1U1L3O4U1T1L1U1T1L1U1T1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L2U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L2U1"
    "T1L1U1L1U3L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L7U2L1U2L2U1L1U4L1U1L1U1L1U1L1U1L1xO1LrMi.4Mc.eM5.7M1.1M1.hK34U1L1"
    "U1L1M1.1U1L1.2M1L3.1U1.6U1.1U3.1U1.1U2L1Uh.1U9LzU1L2U3L3U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L5U1L1.1U1L1U2L2U1fL1cU1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    ".1K7U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U2L1U1L1U1L1U1L1U1L1U1L1U1L2U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1.1U12.2M1.6L15.8K19.1K1.1K2.1K2.1K1.8Or.4O4.tKb.5Ow"
    "M1OaKlNa.4O2K1O2r.1O1K7.2K6M2K2.1K4O2NaO3.2O1.gO1K1OuKr.2O2hKbO1.eNaOxK9M2.4M1.2K1.2OmK4M1K9M1K3"
    "M1K5.iOpK3.4Ob.5Oo.1O6.8K9O15M1Ko.1KxO1iK3O1KiO1K7OaK2.2Na.1M1OfK3.1O8.2O2.2Om.1O7.1O1.3O4.2K1O1"
    "K7.2K2.2K3O1.8K1.4O2.1O3K2.2NaO2.2N6.2O1.1K1.2K3.1O6.4O2.2Om.1O7.1O2.1O2.1O2.2K1.1K5.4K2.2K3.3K1"
    ".7O4.1O1.7NaK2O3K1.bK3.1O9.1O3.1Om.1O7.1O2.1O5.2K1O1K8.1K3.1K3.2O1.fO2K2.2Na.9O1K6.1K3.1O8.2O2.2"
    "Om.1O7.1O2.1O5.2K1O1K7.2K2.2K3.7K3.4O2.1O3K2.2Na.1O1N6.aK1O1.1O6.3O3.1O4.3O2.1O1.1O2.3O2.3O3.3Oc"
    ".4K5.3K3.1K4.2O1.6K1.eNd.dK5O8.1O3.1On.1Og.2K1O1K7.1K3.1K4.7K2.1O3.2O1.2O2K2.2Na.8N7.1O1K3.1O8.1"
    "O3.1On.1Oa.1O5.2K1O1K7.1K3.1K4.7K2.6O2.1O2K2.2Na.1O2K1.cK4O9.1O3.1O15K2O1K7.1K3.1K4O1.5O3K1N7O3"
    "K2.2Nj.1O6.1K3.1Oi.3Oo.1O9.1O1.2O7.3K1.4K6.1K1.1K8.6Na.2K2.dO1cK1O2K7.5O6M1K8.1Na.13O2.1O1.1O5.1"
    "Oo.1O1.1OaK1O2K9O1.2O5.1M1.1K7.1Na.2O4.wO1.nK2.6Nk.1K1.1K1.1K1.4K2O8.1O10.4Kk.1K2O5Kb.1K10.9K1"
    ".1lO17KkO1Na.6O6K4O4K3O1K3O2K7O3K4OdKcO1K1NaK4.2U12.1U1.5U1.2L17.1M1L3O95.1O4.2O7.1O1.1O4.2O15.1"
    "O4.2Ox.1O4.2O7.1O1.1O4.2Of.1O1l.1O4.2O1v.2K3.9Nk.3Og.gU2e.2L6.3Oh8.2OhS1Oq.5O23.3N3O8.7OiK4.9Oj"
    "K3.bOiK2.cOd.1O3.1K2.cO1gKw.3M1.4O1K1.2Na.6Na.hK3.1K1Na.6OzM1O1h.7O5K2OyK1O1.5O1y.aOv.1Kc.4Kc.a"
    "NaOu.2O5.bO18.4Oq.6Nb.11OnK5.4O1hKa.1Kt.2K1Na.6Na.dM1.8Kv.1dK5O1bKhO8.3Na.hK9.cK3OuKdO2NaO18Ke.c"
    "O10Kk.8Na.3O3NaOuM6.2L9U1L1.5U17.2U3.gK3.1KlO4K1O6K1O2K3O1.5L18M1rLdM1LyM11K1sU1L1U1L1U1L1U1L1U1"
    "L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1"
    "L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1"
    "L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L9U1L1U1"
    "L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1"
    "L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L9U8"
    "L6.2U6.2L8U8L8U8L6.2U6.2L8.1U1.1U1.1U1.1U1L8U8Le.2L8T8L8T8L8T8L5.1L2U4T1.1L1.3L3.1L2U4T1.3L4.2L2"
    "U4.4L8U5.5L3.1L2U4T1.3Sb.tS2.5S1.1bS1.gN1M1.2N6.5M1Na.6Md.1fKx.hU1.4U1.2L1U3L2U3L1.1U1.3U5.6U1.1"
    "U1.1U1.1U4.1L1U4L1O4L1.2L2U2.5U1L4.4L1.1N1fU1L1N5.k6N1o.26Nm.hiNu.vgU1cL1cU1L1U3L2U1L1U1L1U1L1U4"
    "L1U1L2U1L6M2U3L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U1L2.6U1L1U1L1K3U1L1.9N1.2L12.1L1.5L1.2O1k.7M1.fK1On.9O7.1O7.1O7.1O7.1O7.1O7.1O7"
    ".1O7.1Kw.1bM1.cwS1.4M1O1N1.pN9K6.1M5.2N3M1O1.4O2e.2K2.2M2O1.1O2i.1M3O1.5O17.1O2m.3N4.aOw.1cOg.w"
    "Na.uN8.1Nf.wNa.13Nf.8wO534.1sOg7pM1Ovr.1vO14M6.2O7gM1.3OgNaO2.kU1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1O1K4.1Ka.1M1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1M2K2O1yNaK2.11M9.2U1L1U1L1U1L1U1L1U1L1U1L1U1L3U1L1U1L1U1L1U1L1U1"
    "L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1"
    "L1U1L1U1L1M1L8U1L1U1L1U2L1U1L1U1L1U1L1U1L1M1.2U1L1U1L1O1U1L1U1L3U1L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1"
    "U1L1U1L1U5L1U5L1U1L1U1L1U1L1U1L1U1L1U1L1U1L1U4L1U1L1U2L1.2U1L1.1L1.1L1U1L1U1L1U1L1U1.lM3U1L1O1M2"
    "L1O7K1O3K1O4K1OnK5.4K1.3N6.aO1g.cK2O1eKi.aNa.6KiO6.3O1.1O2K1NaOsK8.2OnKd.cOt.3K4O1bKe.eM1Na.6O5"
    "K1M1O9NaO5.1O15Ke.9O3K1O8K2.2Na.6OgM1O6.3O1K3O1eK1O1K3O2K2O5K2O1K1O1.oO2M1.2ObK5.2O1M2K2.aO6.2O6"
    ".2O6.9O7.1O7.1L17.1M4L9M1.6L28OzK8.1K2.2Na.6O8mc.cOn.4O1d.6isOa6.2O2y.12L7.cL5.5O1K1Oa.1Od.1O5.1"
    "O1.1O2.1O2.1O30.xOa3.iO1s.2O1i.14Oc.4Kg.gKg.1sO5.1O3r.jNa.7Uq.6Lq.bOaM1O19M2Ov.3O6.2O6.2O6.2O3.z"
    "Oc.1Oq.1Oj.1O2.1Of.2Oe.yO3f.cN19.cN1l.hN2.35K1.3mOt.3O1d.fK1Nr.4OwN4.9OkN1O8N1.5O12K5.5Ou.2O10.4"
    "O8.1N5.16U14L14O26.2Na.6U10.4L10.4O14.8O1g.cUb.1Uf.1U7.1U2.1Lb.1Lf.1L7.1L2.3O1g.cO8n.9Om.aO8.oM6"
    ".1M16.1M9.1xO6.2O1.1O18.1O2.3O1.2On.2N8On.2N7Ov.8N9.1cOj.1O2.5N5OmN6.4Oq.1yO1k.4N2O2Ng.2N1aO1K3"
    ".1K2.5K4O4.1O3.1Ot.2K3.4K1N9.nOtN2.1OtN3.wO8.1OsK2.4N5.gO1i.aOm.2N8Oj.5N8Oi.nN7.28O21.1jU1f.dL1f"
    ".7N6O10K4.8Na.6NaO4M1O1Um.3K5.1M1Lm.62Nv.1O16.1K2.3O2.gO3.1jK4OtNaO1.8OmKbN4.rOiK4.16OlN7.kOn.9"
    "K3O1hKf.bNuK1O2K2O1.9K4O19Kb.7K1.dOp.7Na.6K3O10Ke.1Na.4O1K2O1.8OzK1.2O1.9K3O1cKeO4.4K4.1K2NaO1.1"
    "O1.4Nk.bOi.1OpKc.6K1O2K1.1qO7.1O1.1O4.1Of.1Oa.7O1bKc.5Na.6K4.1O8.2O2.2Om.1O7.1O2.1O5.1K2O1K7.2K2"
    ".2K3.2O1.6K1.5O5K2.2K7.3K5.bOa.1O1.2O1.1O12.1O1K9.1K1.2K1.1K4.1K5O1K1O1.dK2.tO1hKiO4.5Na.4K1O3.u"
    "O1cKkO2.1O1.8Na.4mO1bK7.2K9.nO4K2.yO1cKh.3O1.bNa.12O17KdO1.7Na.6Nk.sOr.2Kf.4Nc.4O7.55O18Kf.2tUw"
    "LwNj.cO8.2O1.2O8.1O2.1OoK6.1K2.2K4O1K1O1K2.cNa.1yO8.2O13K7.2K7O1.1O1K1.rO1KaO14K7O1K4.8K1.8O1Kb"
    "O1aKg.3O1.iO21.5jOx.fNa.6O9.1O11K8.1K8O1.fNt.5Ou.2Km.1Ke.21O7.1O2.1O12K6.3K1.1K2.1K7O1K1.8Na.6O6"
    ".1O2.1OwK5.1K2.1K5O1.7Na.8mOjK4.9K2O1K1Od.1OyK7.3K5.dNaK1.2dO1.fNl.17Opm.2uN33.hO5g.218O2p.fOts"
    ".gK1O6Kf.aO32z.5Og7.5a1OuKiNa.1c6Oft.7Ov.1Na.6O27.1Na.6Ou.2K5.bO1cK7.9M4.cNa.1N7.1Ol.5Oj.c0M3O14"
    "M2.3Na.5iUwLwNn.2xO23.4K1O1K1j.7K4Md.1sM2.1M1K1.bK2.eO4qg.8Oye.15Oa.6w7M4.1M7.1M2.1O83.fO1.tO3.2"
    "O1.eO4.8Ob0.1s4O2z.5Od.3O9.7Oa.3K2.381Na.eeK1a.2Kn.f2K5.3K6.8K8.2K7.uK4.44K3.3fNk.cNk.30Np.3rUq"
    "LqUqL7.1LiUqLqU1.1U2.2U1.2U2.2U4.1U8L4.1L1.1L7.1LbUqLqU2.1U4.2U8.1U7.1LqU2.1U4.1U5.1U1.3U7.1LqUq"
    "LqUqLqUqLqUqLqUqLqUqLs.2Up.1Lp.1L6Up.1Lp.1L6Up.1Lp.1L6Up.1Lp.1L6Up.1Lp.1L6U1L1.2N1e.e8K1j.4K1e.8"
    "K1.eK1.mK5.1Kf.uoLaO1Lk.6L6.5xK7.1Kh.2K7.1K2.1K5.5M1q.xK1.34O19.3K7M7.2Na.4O1.8xOuK1.hO18K4Na.d2"
    "OrM1K4Na.5yOuK2O1Na.dhO7.1O4.1O2.1Of.1O5h.2N9K7.15UyLyK7M1.4Na.lzN1n.1N3.1N4.24N19.1Nf.5eO4.1Or"
    ".1O2.1O1.2O1.1Oa.1O4.1O1.1O1.6O1.4O1.1O1.1O1.1O3.1O2.1O1.2O1.1O1.1O1.1O1.1O1.1O2.1O1.2O4.1O7.1O4"
    ".1O4.1O1.1Oa.1Oh.5O3.1O5.1Oh.g4Nd.25fNa.smOwyo.wO37e.6O66.2O4g2.eO5rl.fOha.1wiOf2.15uO3t7.5O38g"
    ".f9e8K6o.47bk"
)

# Class bits, as the C code's C_* flags: what each run letter sets.
_C_L, _C_N, _C_S, _C_U, _C_W = 1, 2, 4, 8, 16
_BITS = {
    "U": _C_L | _C_U,
    "L": _C_L | _C_W,
    "T": _C_L | _C_U,
    "M": _C_L | _C_U | _C_W,
    "O": _C_L | _C_U | _C_W,
    "K": _C_U | _C_W,
    "N": _C_N,
    "S": _C_S,
    ".": 0,
}


def class_runs() -> list[tuple[int, int]]:
    """(first code point, class bits) of each run of `_CLASS_RUNS`, in order."""
    runs, cp, text, i = [], 0, "".join(_CLASS_RUNS), 0
    while i < len(text):
        j = i + 1
        while j < len(text) and text[j] not in _BITS:
            j += 1
        runs.append((cp, _BITS[text[i]]))
        cp += int(text[i + 1 : j], 36)
        i = j
    assert cp == 0x110000, "_CLASS_RUNS must cover every code point"
    return runs


_P = ctypes.c_void_p
_SIGNATURES = {
    "bpe_create": [_P, _P, _P, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)],
    "bpe_free": [_P],
    "bpe_encode": [_P, ctypes.c_char_p, ctypes.c_int64, _P, ctypes.POINTER(ctypes.c_int64)],
    "bpe_encode_batch": [_P, ctypes.c_char_p, _P, ctypes.c_int64, _P, _P],
    "bpe_classify": [_P, ctypes.c_int64, _P],
}
_PAD = b"\0" * 8  # the C code reads keys 8 bytes at a time


def _class_runs_header() -> dict[str, str]:
    """bpe.c's CLASS_RUNS entries, (first code point << 8) | class bits, as the header it includes."""
    return {"bpe_class_runs.h": ",".join(f"0x{cp << 8 | bits:X}" for cp, bits in class_runs())}


_lib: ctypes.CDLL | None | bool = False


def library() -> ctypes.CDLL | None:
    """The compiled encoder (built on first use by llmfn.cbuild), or None without a C compiler."""
    global _lib
    if _lib is False:
        _lib = cbuild.load("llmfn_bpe", "bpe.c", _SIGNATURES, generated=_class_runs_header())
    return _lib


class NativeRankBPE:
    """tiktoken's `encode_ordinary` in C for the patterns in PATTERNS. Thread-safe: the encoder is
    read-only once built, and each call has its own buffers."""

    def __init__(self, lib: ctypes.CDLL, handle: int):
        self._lib, self._handle = lib, handle
        weakref.finalize(self, lib.bpe_free, handle)

    @classmethod
    def build(cls, ranks: dict[bytes, int], pattern: str) -> NativeRankBPE | None:
        """None when the C library cannot be built here or `pattern` is not one with a native
        splitter (the caller then keeps its tokenizers path). Raises TokenizerError, as
        tiktoken_file.resolve does, when a byte has no rank."""
        kind = PATTERNS.get(pattern)
        lib = library() if kind is not None else None
        if lib is None or not ranks or max(ranks.values()) >= 2**32 - 1 or min(ranks.values()) < 0:
            return None
        missing = sorted(set(range(256)) - {t[0] for t in ranks if len(t) == 1})
        if missing:
            raise TokenizerError(
                f"bytes {', '.join(f'0x{b:02X}' for b in missing[:16])}{'...' if len(missing) > 16 else ''} "
                "have no rank; tiktoken cannot encode text containing them"
            )
        tokens = list(ranks)
        blob = b"".join(tokens)
        offsets = np.zeros(len(tokens) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, tokens), np.int64, len(tokens)), out=offsets[1:])
        values = np.fromiter(ranks.values(), np.uint32, len(tokens))
        handle = ctypes.c_void_p()
        rc = lib.bpe_create(
            blob, offsets.ctypes.data, values.ctypes.data, len(tokens), kind, ctypes.byref(handle)
        )
        if rc != 0:
            raise MemoryError("native BPE: out of memory building the rank table")
        return cls(lib, handle.value)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, exactly as tiktoken's encode_ordinary(text)."""
        data = utf8(text)
        out = np.empty(len(data), np.uint32)  # at most one id per byte
        count = ctypes.c_int64()
        if self._lib.bpe_encode(self._handle, data + _PAD, len(data), out.ctypes.data, ctypes.byref(count)):
            raise MemoryError("native BPE: out of memory (or a piece of 4 GiB or more)")
        return out[: count.value].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each text, in order; the texts are encoded in parallel (OpenMP)."""
        joined, offsets = utf8_joined(texts)
        out = np.empty(int(offsets[-1]), np.uint32)
        counts = np.empty(len(texts), np.int64)
        if self._lib.bpe_encode_batch(self._handle, joined + _PAD, offsets.ctypes.data, len(texts),
                                      out.ctypes.data, counts.ctypes.data):  # fmt: skip
            raise MemoryError("native BPE: out of memory (or a piece of 4 GiB or more)")
        return split_ids(out, counts)


def classify(code_points: Sequence[int]) -> list[int]:
    """The native class bits (C_* in csrc/bpe.c) of each code point; for the tests."""
    lib = library()
    assert lib is not None
    cps = np.asarray(code_points, np.uint32)
    out = np.empty(len(cps), np.uint8)
    lib.bpe_classify(cps.ctypes.data, len(cps), out.ctypes.data)
    return out.tolist()
