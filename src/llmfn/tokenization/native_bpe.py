"""A native encoder for tiktoken-format BPE (cl100k_base, o200k_base, Qwen-1's qwen.tiktoken and
GPT-2's r50k/p50k pattern): the same ids as tiktoken's `encode_ordinary`, faster, with an OpenMP
batch call.

Two parts in C (built once per machine by llmfn.cbuild):

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

# Pattern -> the C matcher's number (PAT_* in SOURCE).
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


SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Class bits of a code point. U and W are o200k's [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] and
   [\p{Ll}\p{Lm}\p{Lo}\p{M}]; NL marks \r and \n. */
enum { C_L = 1, C_N = 2, C_S = 4, C_U = 8, C_W = 16, C_NL = 32 };
enum { PAT_CL100K = 0, PAT_O200K = 1, PAT_QWEN = 2, PAT_R50K = 3 };
#define NO_RANK UINT32_MAX
#define SMALL_PIECE 128   /* longer pieces take the heap BPE */

/* (first code point << 8) | class bits, one entry per run, in code point order. */
static const uint32_t CLASS_RUNS[] = { @CLASS_RUNS@ };
static uint8_t CLASS[0x110000];

__attribute__((constructor)) static void init_classes(void) {
    size_t n = sizeof(CLASS_RUNS) / sizeof(CLASS_RUNS[0]);
    for (size_t k = 0; k < n; k++) {
        uint32_t first = CLASS_RUNS[k] >> 8, end = k + 1 < n ? CLASS_RUNS[k + 1] >> 8 : 0x110000;
        memset(CLASS + first, (int)(CLASS_RUNS[k] & 0xFF), end - first);
    }
    CLASS['\r'] |= C_NL;
    CLASS['\n'] |= C_NL;
}

/* ---- characters ------------------------------------------------------------------------------ */

/* Class bits of the character at s[i] (i < n); *len gets its length in bytes. Text comes from a
   Python str, so it is valid UTF-8; a malformed byte would count as a 1-byte character of no
   class, so the matchers still always make progress. */
static inline unsigned char_at(const uint8_t *s, size_t n, size_t i, size_t *len) {
    uint32_t b = s[i], cp;
    size_t l;
    if (b < 0x80) { *len = 1; return CLASS[b]; }
    if (b >= 0xF0) { l = 4; cp = b & 0x07; }
    else if (b >= 0xE0) { l = 3; cp = b & 0x0F; }
    else if (b >= 0xC0) { l = 2; cp = b & 0x1F; }
    else { *len = 1; return 0; }
    if (i + l > n) { *len = 1; return 0; }
    for (size_t k = 1; k < l; k++) cp = (cp << 6) | (s[i + k] & 0x3F);
    *len = l;
    return cp < 0x110000 ? CLASS[cp] : 0;
}

/* End of the run from i of characters whose class has a bit of `any`. */
static inline size_t span(const uint8_t *s, size_t n, size_t i, unsigned any) {
    size_t l;
    while (i < n && (char_at(s, n, i, &l) & any)) i += l;
    return i;
}

/* End of the run from i of characters whose class has no bit of `none`. */
static inline size_t span_not(const uint8_t *s, size_t n, size_t i, unsigned none) {
    size_t l;
    while (i < n && !(char_at(s, n, i, &l) & none)) i += l;
    return i;
}

/* ---- the alternatives the patterns share; each returns the match's end, or 0 for none ------- */

/* Contractions 's 't 're 've 'm 'll 'd at i, as a length. `fold`: case-insensitive as Rust's (?i),
   whose simple case folding also matches U+017F LATIN SMALL LETTER LONG S for 's'. */
static inline size_t contraction(const uint8_t *s, size_t n, size_t i, int fold) {
    if (i + 1 >= n || s[i] != '\'') return 0;
    uint8_t a = fold ? s[i + 1] | 0x20 : s[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (fold && s[i + 1] == 0xC5 && i + 2 < n && s[i + 2] == 0xBF) return 3;
    if (i + 2 >= n) return 0;
    uint8_t b = fold ? s[i + 2] | 0x20 : s[i + 2];
    return ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) ? 3 : 0;
}

/* [^\r\n\p{L}\p{N}]?\p{L}+ (possessive or not: the same matches). */
static inline size_t letters(const uint8_t *s, size_t n, size_t i, unsigned c0, size_t l0) {
    size_t j = (c0 & (C_NL | C_L | C_N)) ? i : i + l0;
    size_t e = span(s, n, j, C_L);
    return e > j ? e : 0;
}

/* \p{N}{1,max} */
static inline size_t digits(const uint8_t *s, size_t n, size_t i, int max) {
    size_t j = i, l;
    for (int k = 0; k < max && j < n && (char_at(s, n, j, &l) & C_N); k++) j += l;
    return j > i ? j : 0;
}

/* ` ?C+` for the class C of characters with a bit of `any` (r50k's letters and numbers): the
   space is given back when no C character follows it. */
static inline size_t space_then(const uint8_t *s, size_t n, size_t i, unsigned c0, unsigned any) {
    size_t l;
    if (s[i] == ' ' && i + 1 < n && (char_at(s, n, i + 1, &l) & any)) return span(s, n, i + 1, any);
    return (c0 & any) ? span(s, n, i, any) : 0;
}

/* ` ?[^\s\p{L}\p{N}]+` then a run of `tail` bytes: 0 none, 1 [\r\n]*, 2 [\r\n/]* (o200k). */
static inline size_t punct(const uint8_t *s, size_t n, size_t i, unsigned c0, int tail) {
    const unsigned other = C_S | C_L | C_N;
    size_t j, l;
    if (s[i] == ' ' && i + 1 < n && !(char_at(s, n, i + 1, &l) & other)) j = span_not(s, n, i + 1, other);
    else if (!(c0 & other)) j = span_not(s, n, i, other);
    else return 0;
    while (tail && j < n && (s[j] == '\r' || s[j] == '\n' || (tail == 2 && s[j] == '/'))) j++;
    return j;
}

/* The whitespace alternatives, for a whitespace character at i: `to_end` \s++$ (cl100k, r50k:
   a run reaching the end of the text is one piece); `newline` \s*[\r\n]+ (\s* backtracks to the
   run's last \r or \n); \s+(?!\S) (the run less its last character when a non-space follows it);
   \s / \s+ (what is left: a single character). */
static size_t spaces(const uint8_t *s, size_t n, size_t i, int to_end, int newline) {
    size_t end = i, last = i, nl = 0, l;
    while (end < n) {
        unsigned c = char_at(s, n, end, &l);
        if (!(c & C_S)) break;
        last = end;
        if (c & C_NL) nl = end + 1;
        end += l;
    }
    if (end == i) return i + l;   /* not whitespace: unreachable, the other alternatives match */
    if (to_end && end == n) return n;
    if (newline && nl) return nl;
    if (end == n) return n;
    return last > i ? last : end;
}

/* ---- the patterns: the end of the piece that starts at i ------------------------------------- */

/* cl100k; Qwen-1's pattern is the same with \p{N} one digit at a time (max_digits 1) and no
   \s++$ alternative (to_end 0). */
static size_t piece_cl100k(const uint8_t *s, size_t n, size_t i, int max_digits, int to_end) {
    size_t l0, e;
    unsigned c0 = char_at(s, n, i, &l0);
    if ((e = contraction(s, n, i, 1))) return i + e;
    if ((e = letters(s, n, i, c0, l0))) return e;
    if ((e = digits(s, n, i, max_digits))) return e;
    if ((e = punct(s, n, i, c0, 1))) return e;
    return spaces(s, n, i, to_end, 1);
}

static size_t piece_r50k(const uint8_t *s, size_t n, size_t i) {
    size_t l0, e;
    unsigned c0 = char_at(s, n, i, &l0);
    if ((e = contraction(s, n, i, 0))) return i + e;
    if ((e = space_then(s, n, i, c0, C_L))) return e;
    if ((e = space_then(s, n, i, c0, C_N))) return e;
    if ((e = punct(s, n, i, c0, 0))) return e;
    return spaces(s, n, i, 1, 0);
}

/* o200k's first alternative from st, after its optional [^\r\n\p{L}\p{N}]: U* W+. The greedy U*
   gives characters back, last first, until one starts a W run: U and W share Lm, Lo and M, so
   e.g. "Aʰ" + "C" + " " (ʰ is Lm) gives back "C" and "ʰ" and matches "Aʰ". */
static size_t upper_lower(const uint8_t *s, size_t n, size_t st) {
    size_t p = span(s, n, st, C_U), l;
    for (;;) {
        if (p < n && (char_at(s, n, p, &l) & C_W)) return span(s, n, p, C_W);
        if (p == st) return 0;
        do p--; while (p > st && (s[p] & 0xC0) == 0x80);
    }
}

/* o200k's second alternative from st: U+ W*. */
static size_t upper_then_lower(const uint8_t *s, size_t n, size_t st) {
    size_t e = span(s, n, st, C_U);
    return e > st ? span(s, n, e, C_W) : 0;
}

/* o200k's two word alternatives, each first with its optional leading character taken, then
   without it (which matters when that character is a mark: marks are in U and W too), then the
   optional contraction. */
static size_t o200k_word(const uint8_t *s, size_t n, size_t i, unsigned c0, size_t l0) {
    int lead = !(c0 & (C_NL | C_L | C_N));
    size_t e = 0;
    if (lead) e = upper_lower(s, n, i + l0);
    if (!e) e = upper_lower(s, n, i);
    if (!e && lead) e = upper_then_lower(s, n, i + l0);
    if (!e) e = upper_then_lower(s, n, i);
    return e ? e + contraction(s, n, e, 1) : 0;
}

static size_t piece_o200k(const uint8_t *s, size_t n, size_t i) {
    size_t l0, e;
    unsigned c0 = char_at(s, n, i, &l0);
    if ((e = o200k_word(s, n, i, c0, l0))) return e;
    if ((e = digits(s, n, i, 3))) return e;
    if ((e = punct(s, n, i, c0, 2))) return e;
    return spaces(s, n, i, 0, 1);
}

/* ---- the rank table: token bytes -> rank, open addressing ------------------------------------ */

typedef struct {
    uint64_t head;   /* the token's first 8 bytes, zero-padded */
    uint32_t len;    /* 0: empty slot */
    uint32_t rank;
    uint64_t off;    /* where the token's bytes start in blob */
} Slot;

typedef struct {
    Slot *slots;
    size_t mask;
    uint8_t *blob;
    uint32_t byte_rank[256];
    uint32_t *pair_rank;   /* [65536]: the ranks of 2-byte tokens, the first merges' lookups */
    int pattern;
} Encoder;

/* Keys are read 8 bytes at a time: every buffer read here (the text, the blob) has 8 readable
   bytes past its end. */
static inline uint64_t load8(const uint8_t *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* The first min(len, 8) bytes of p as a word, the rest zero. */
static inline uint64_t head_of(const uint8_t *p, size_t len) {
    uint64_t w = load8(p);
    if (len >= 8) return w;
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return w & ~(~0ull >> (8 * len));
#else
    return w & ((1ull << (8 * len)) - 1);
#endif
}

static inline uint64_t hash_key(uint64_t head, const uint8_t *p, size_t len) {
    uint64_t h = (head ^ (len * 0x9E3779B97F4A7C15ull)) * 0xFF51AFD7ED558CCDull;
    for (size_t k = 8; k < len; k += 8) h = (h ^ head_of(p + k, len - k)) * 0xC4CEB9FE1A85EC53ull;
    return h ^ (h >> 29);
}

static inline uint32_t rank_of(const Encoder *e, const uint8_t *p, size_t len) {
    if (len == 1) return e->byte_rank[*p];
    if (len == 2) return e->pair_rank[p[0] << 8 | p[1]];
    uint64_t head = head_of(p, len);
    for (size_t i = hash_key(head, p, len) & e->mask;; i = (i + 1) & e->mask) {
        const Slot *t = &e->slots[i];
        if (t->len == len && t->head == head &&
            (len <= 8 || memcmp(e->blob + t->off + 8, p + 8, len - 8) == 0))
            return t->rank;
        if (t->len == 0) return NO_RANK;
    }
}

/* ---- byte pair encoding of one piece --------------------------------------------------------- */

/* tiktoken's _byte_pair_merge, for short pieces: parts[k] starts at start[k] (start[np-1] is the
   end), pair[k] ranks part k joined with part k+1; merge the lowest (leftmost on ties). */
static size_t bpe_small(const Encoder *e, const uint8_t *p, size_t m, uint32_t *out) {
    uint32_t start[SMALL_PIECE + 1], pair[SMALL_PIECE + 1], tok[SMALL_PIECE + 1];
    size_t np = m + 1;
    for (size_t k = 0; k < m; k++) {
        start[k] = (uint32_t)k;
        tok[k] = e->byte_rank[p[k]];
        pair[k] = k + 1 < m ? rank_of(e, p + k, 2) : NO_RANK;
    }
    start[m] = (uint32_t)m;
    pair[m] = NO_RANK;
    for (;;) {
        uint32_t best = NO_RANK;
        size_t b = 0;
        for (size_t k = 0; k + 1 < np; k++)
            if (pair[k] < best) { best = pair[k]; b = k; }
        if (best == NO_RANK) break;
        /* Parts b and b+1 become one: the pairs at b-1 and b now reach one part further. */
        if (b > 0) pair[b - 1] = b + 2 < np ? rank_of(e, p + start[b - 1], start[b + 2] - start[b - 1]) : NO_RANK;
        pair[b] = b + 3 < np ? rank_of(e, p + start[b], start[b + 3] - start[b]) : NO_RANK;
        tok[b] = best;
        memmove(start + b + 1, start + b + 2, (np - b - 2) * sizeof(uint32_t));
        memmove(pair + b + 1, pair + b + 2, (np - b - 2) * sizeof(uint32_t));
        memmove(tok + b + 1, tok + b + 2, (np - b - 2) * sizeof(uint32_t));
        np--;
    }
    memcpy(out, tok, (np - 1) * sizeof(uint32_t));
    return np - 1;
}

/* Binary min-heap of (rank << 32 | start): the lowest rank first, then the leftmost. */
static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0 && h[(i - 1) / 2] > v) { h[i] = h[(i - 1) / 2]; i = (i - 1) / 2; }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
    return top;
}

/* The same merges for long pieces in O(m log m): parts form a linked list by start offset and
   every current pair sits in the heap. A heap entry is stale once its pair changed: a pair at a
   given start only grows, so its rank never comes back, and pair[start] == rank tells a live
   entry. Returns SIZE_MAX when out of memory (or the piece is 4 GiB or more). */
static size_t bpe_large(const Encoder *e, const uint8_t *p, size_t m, uint32_t *out) {
    uint32_t *next = malloc(m * sizeof(uint32_t)), *prev = malloc(m * sizeof(uint32_t));
    uint32_t *pair = malloc(m * sizeof(uint32_t)), *tok = malloc(m * sizeof(uint32_t));
    uint64_t *heap = malloc(3 * m * sizeof(uint64_t));
    size_t nh = 0, k = 0;
    if (m >= UINT32_MAX || !next || !prev || !pair || !tok || !heap) {
        free(next); free(prev); free(pair); free(tok); free(heap);
        return SIZE_MAX;
    }
    for (size_t i = 0; i < m; i++) {
        next[i] = (uint32_t)(i + 1);
        prev[i] = (uint32_t)(i - 1);
        tok[i] = e->byte_rank[p[i]];
        pair[i] = i + 1 < m ? rank_of(e, p + i, 2) : NO_RANK;
        if (pair[i] != NO_RANK) heap_push(heap, &nh, (uint64_t)pair[i] << 32 | i);
    }
    while (nh) {
        uint64_t top = heap_pop(heap, &nh);
        uint32_t a = (uint32_t)top, rank = (uint32_t)(top >> 32);
        if (pair[a] != rank) continue;
        uint32_t b = next[a], c = next[b];   /* a absorbs b; c follows */
        next[a] = c;
        if (c < m) prev[c] = a;
        pair[b] = NO_RANK;
        tok[a] = rank;
        pair[a] = c < m ? rank_of(e, p + a, next[c] - a) : NO_RANK;
        if (pair[a] != NO_RANK) heap_push(heap, &nh, (uint64_t)pair[a] << 32 | a);
        if (a > 0) {
            uint32_t z = prev[a];
            pair[z] = rank_of(e, p + z, c - z);
            if (pair[z] != NO_RANK) heap_push(heap, &nh, (uint64_t)pair[z] << 32 | z);
        }
    }
    for (size_t i = 0; i < m; i = next[i]) out[k++] = tok[i];
    free(next); free(prev); free(pair); free(tok); free(heap);
    return k;
}

static inline size_t encode_piece(const Encoder *e, const uint8_t *p, size_t m, uint32_t *out) {
    uint32_t r = rank_of(e, p, m);
    if (r != NO_RANK) { *out = r; return 1; }
    return m <= SMALL_PIECE ? bpe_small(e, p, m, out) : bpe_large(e, p, m, out);
}

/* Encode s[0..n) into out (at most n ids); the number of ids, or -1 when out of memory. */
static int64_t encode_text(const Encoder *e, const uint8_t *s, size_t n, uint32_t *out) {
    size_t i = 0, k = 0;
    while (i < n) {
        size_t j;
        switch (e->pattern) {
            case PAT_CL100K: j = piece_cl100k(s, n, i, 3, 1); break;
            case PAT_O200K: j = piece_o200k(s, n, i); break;
            case PAT_QWEN: j = piece_cl100k(s, n, i, 1, 0); break;
            default: j = piece_r50k(s, n, i); break;
        }
        size_t got = encode_piece(e, s + i, j - i, out + k);
        if (got == SIZE_MAX) return -1;
        k += got;
        i = j;
    }
    return (int64_t)k;
}

/* ---- entry points ---------------------------------------------------------------------------- */

int bpe_free(void *handle) {
    Encoder *e = handle;
    if (e) { free(e->slots); free(e->blob); free(e->pair_rank); free(e); }
    return 0;
}

/* An encoder for n tokens: token t is blob[offsets[t]..offsets[t+1]) with rank ranks[t], and
   every single byte is a token. Returns 0, 1 when out of memory, 2 when a byte has no rank. */
int bpe_create(const uint8_t *blob, const int64_t *offsets, const uint32_t *ranks, int64_t n, int pattern,
               void **handle) {
    Encoder *e = calloc(1, sizeof(Encoder));
    size_t cap = 16, size = (size_t)offsets[n];
    while (cap < 2 * (size_t)n) cap *= 2;   /* load factor <= 1/2 */
    if (!e || !(e->slots = calloc(cap, sizeof(Slot))) || !(e->blob = calloc(size + 8, 1)) ||
        !(e->pair_rank = malloc(65536 * sizeof(uint32_t)))) {
        bpe_free(e);
        return 1;
    }
    memcpy(e->blob, blob, size);
    e->mask = cap - 1;
    e->pattern = pattern;
    for (int b = 0; b < 256; b++) e->byte_rank[b] = NO_RANK;
    for (int b = 0; b < 65536; b++) e->pair_rank[b] = NO_RANK;
    for (int64_t t = 0; t < n; t++) {
        const uint8_t *p = e->blob + offsets[t];
        size_t len = (size_t)(offsets[t + 1] - offsets[t]);
        if (len == 0) continue;
        if (len == 1) e->byte_rank[*p] = ranks[t];
        if (len == 2) e->pair_rank[p[0] << 8 | p[1]] = ranks[t];
        uint64_t head = head_of(p, len);
        size_t i = hash_key(head, p, len) & e->mask;
        while (e->slots[i].len) i = (i + 1) & e->mask;
        e->slots[i] = (Slot){head, (uint32_t)len, ranks[t], (uint64_t)offsets[t]};
    }
    for (int b = 0; b < 256; b++)
        if (e->byte_rank[b] == NO_RANK) { bpe_free(e); return 2; }
    *handle = e;
    return 0;
}

/* text[0..n) (with 8 readable bytes after it) -> out (room for n ids), *count ids. */
int bpe_encode(const void *handle, const uint8_t *text, int64_t n, uint32_t *out, int64_t *count) {
    *count = encode_text(handle, text, (size_t)n, out);
    return *count < 0;
}

/* Text t is text[offsets[t]..offsets[t+1]). Each encodes, in parallel, into out at its own byte
   offset (ids <= bytes); then the ids are packed in text order: counts[t] ids per text. */
int bpe_encode_batch(const void *handle, const uint8_t *text, const int64_t *offsets, int64_t n_texts,
                     uint32_t *out, int64_t *counts) {
    int failed = 0;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t t = 0; t < n_texts; t++) {
        counts[t] = encode_text(handle, text + offsets[t], (size_t)(offsets[t + 1] - offsets[t]), out + offsets[t]);
        if (counts[t] < 0) {
            #pragma omp atomic write
            failed = 1;
        }
    }
    if (failed) return 1;
    int64_t w = 0;
    for (int64_t t = 0; t < n_texts; t++) {
        memmove(out + w, out + offsets[t], (size_t)counts[t] * sizeof(uint32_t));
        w += counts[t];
    }
    return 0;
}

/* The class bits of n code points (for the tests). */
int bpe_classify(const uint32_t *cps, int64_t n, uint8_t *out) {
    for (int64_t k = 0; k < n; k++) out[k] = cps[k] < 0x110000 ? CLASS[cps[k]] : 0;
    return 0;
}
"""

_P = ctypes.c_void_p
_SIGNATURES = {
    "bpe_create": [_P, _P, _P, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)],
    "bpe_free": [_P],
    "bpe_encode": [_P, ctypes.c_char_p, ctypes.c_int64, _P, ctypes.POINTER(ctypes.c_int64)],
    "bpe_encode_batch": [_P, ctypes.c_char_p, _P, ctypes.c_int64, _P, _P],
    "bpe_classify": [_P, ctypes.c_int64, _P],
}
_PAD = b"\0" * 8  # the C code reads keys 8 bytes at a time


def _source() -> str:
    runs = ",".join(f"0x{cp << 8 | bits:X}" for cp, bits in class_runs())
    return SOURCE.replace("@CLASS_RUNS@", runs)


_lib: ctypes.CDLL | None | bool = False


def library() -> ctypes.CDLL | None:
    """The compiled encoder (built on first use by llmfn.cbuild), or None without a C compiler."""
    global _lib
    if _lib is False:
        _lib = cbuild.load("llmfn_bpe", _source(), _SIGNATURES)
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
    """The native class bits (C_* above) of each code point; for the tests."""
    lib = library()
    assert lib is not None
    cps = np.asarray(code_points, np.uint32)
    out = np.empty(len(cps), np.uint8)
    lib.bpe_classify(cps.ctypes.data, len(cps), out.ctypes.data)
    return out.tolist()
