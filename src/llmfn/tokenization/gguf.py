"""A Hugging Face-style tokenizer from GGUF metadata that tokenizes as llama.cpp does.

`tokenizer_files_from_gguf(reader)` returns the texts of `tokenizer.json` and
`tokenizer_config.json`; `llmfn convert gguf` writes them into a model folder and
`load_tokenizer("model.gguf")` reads them straight from the file.

- `tokenizer.ggml.model == "gpt2"` (byte-level BPE): llama.cpp splits text with the regexes of
  its `tokenizer.ggml.pre` type, one after another, keeping matches and the text between them,
  then merges by rank. The same regexes become `Split` pre-tokenizers here. A byte that the
  vocabulary lacks cannot merge with its neighbours in llama.cpp and is then dropped, while
  `tokenizers` drops it first and merges across it, so each such byte is split out on its own
  (after the byte-level mapping, so bytes inside a character are split out exactly).
- `tokenizer.ggml.model == "llama"` (SentencePiece BPE with scores and byte tokens): a space
  prefix, spaces as "▁", merges by score with byte fallback; user-defined tokens are always
  matched from text, control tokens only in trusted text.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from llmfn.errors import TokenizerError, UnsupportedModelError
from llmfn.tokenization.byte_level import bytes_to_unicode, merges_by_priority

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges), as in llama.cpp's llama-vocab.cpp
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    "default": (_DEFAULT, False),
    **{
        name: ([_LLAMA3], True)
        for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral")
    },
    **{name: ([_LLAMA3], False) for name in ("dbrx", "smaug-bpe")},
    **{
        name: ([_QWEN2], False)
        for name in ("qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen", "stablelm2", "megrez")
    },
    **{
        name: ([r"\p{N}", _GPT2], False)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
    },
    **{
        name: ([_GPT2], False)
        for name in (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v1-en",
            "jina-v2-es",
            "jina-v2-de",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
        )
    },
}

# llama.cpp adds these metadata ids to the end-of-generation set.
_EOG_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def _value(reader, key: str, default=None):
    """A metadata value from a `gguf.GGUFReader` or from `read_gguf_metadata`'s dict."""
    if isinstance(reader, dict):
        return reader.get(key, default)
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):
        return field.contents()
    # gguf < 0.12: decode by hand
    import gguf

    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        items = [field.parts[i] for i in field.data]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(p).decode("utf-8") for p in items]
        return [p.tolist()[0] for p in items]
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def read_gguf_metadata(path) -> dict:
    """The key-value metadata of a GGUF file, read without touching its tensors.

    (`gguf.GGUFReader` also indexes every tensor, which takes seconds; the tokenizer needs only
    the metadata at the head of the file.)
    """
    import mmap
    import struct

    import numpy as np

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise TokenizerError(f"{path}: not a GGUF file")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version == 1:
            raise TokenizerError(f"{path}: GGUF version 1 is not supported")
        _, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", buf, pos)
            return buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n

        def value(kind, pos):
            if kind == 8:
                return string(pos)
            if kind == 9:
                sub, n = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if sub in _SCALARS:
                    dtype = np.dtype(_SCALARS[sub])
                    arr = np.frombuffer(buf, dtype=dtype, count=n, offset=pos).tolist()
                    return arr, pos + n * dtype.itemsize
                items = []
                for _ in range(n):
                    item, pos = value(sub, pos)
                    items.append(item)
                return items, pos
            if kind in _SCALARS:
                fmt = _SCALARS[kind]
                return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
            raise TokenizerError(f"{path}: unknown GGUF value type {kind}")

        meta = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = value(kind, pos + 4)
        return meta


def gguf_eos_ids(reader) -> list[int]:
    """End-of-generation ids named in the metadata (eos, eot, eom)."""
    n = len(_value(reader, "tokenizer.ggml.tokens", []))
    ids = [_value(reader, k) for k in _EOG_KEYS]
    return [int(i) for i in ids if i is not None and 0 <= int(i) < n]


def tokenizer_files_from_gguf(reader) -> dict[str, str]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} from a `gguf.GGUFReader` (or the dict
    that `read_gguf_metadata` returns)."""
    model = _value(reader, "tokenizer.ggml.model")
    tokens = _value(reader, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise TokenizerError("GGUF file has no tokenizer metadata (tokenizer.ggml.model / tokens)")
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = _value(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model == "gpt2":
        hf, add_bos_default = _byte_level_bpe(reader, tokens, types)
    elif model == "llama":
        hf, add_bos_default = _sentencepiece_bpe(reader, tokens, types)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' and 'llama')"
        )

    def name(key: str) -> str | None:
        i = _value(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    add_bos = bool(_value(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(_value(reader, "tokenizer.ggml.add_eos_token", False))
    bos = name("tokenizer.ggml.bos_token_id")
    eos = name("tokenizer.ggml.eos_token_id")
    if add_bos and bos is not None:
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokens.index(bos))],
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    config = {k: v for k, v in config.items() if v is not None}
    template = _value(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return {
        "tokenizer.json": hf.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
    }


def _added_tokens(tokens: list[str], types: list[int], *, normalized: bool) -> list[AddedToken]:
    out = []
    for tok, kind in zip(tokens, types, strict=True):
        if kind in (CONTROL, UNKNOWN):
            out.append(AddedToken(tok, special=True, normalized=False))
        elif kind == USER_DEFINED:
            out.append(AddedToken(tok, special=False, normalized=normalized))
    return out


def _byte_level_bpe(reader, tokens: list[str], types: list[int]) -> tuple[HFTokenizer, bool]:
    pre = _value(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab[tok] = i  # llama.cpp: a later duplicate wins
    merges = []
    for line in _value(reader, "tokenizer.ggml.merges") or []:
        pos = line.find(" ", 1)  # as llama.cpp: the separator is searched from the second character
        a, b = line[:pos], line[pos + 1 :]
        if pos > 0 and a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    alphabet = bytes_to_unicode()
    missing = [alphabet[b] for b in range(256) if alphabet[b] not in vocab]
    steps = [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
    if missing:
        steps.append(
            pre_tokenizers.Split(Regex("[" + "".join(_class_escape(c) for c in missing) + "]"), "isolated")
        )
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    hf.decoder = decoders.ByteLevel()
    hf.add_tokens(_added_tokens(tokens, types, normalized=False))
    add_bos_default = pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral")
    return hf, add_bos_default


def _class_escape(c: str) -> str:
    return "\\" + c if c in "\\]^-[" else c


def _sentencepiece_bpe(reader, tokens: list[str], types: list[int]) -> tuple[HFTokenizer, bool]:
    scores = _value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    add_space_prefix = bool(_value(reader, "tokenizer.ggml.add_space_prefix", True))
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab[tok] = i
    # llama.cpp merges any pair whose concatenation is a token (of any type) by that token's score.
    mergeable = {tok: float(scores[i]) for tok, i in vocab.items() if types[i] != BYTE}
    merges = merges_by_priority(mergeable)
    has_bytes = any(t == BYTE for t in types)
    unk_id = _value(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    hf = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=has_bytes)
    )
    steps = ([normalizers.Prepend("\u2581")] if add_space_prefix else []) + [
        normalizers.Replace(" ", "\u2581")
    ]
    hf.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    hf.add_tokens(_added_tokens(tokens, types, normalized=False))
    return hf, True
