"""Sentence embeddings: sentence-transformers folders over the BERT encoder (llmfn.models.bert).

    model = load_embedding_model(folder)            # Model(kind="embedding", ...)
    vecs = embed(model, ["a sentence", "another"])  # FloatTensor [n, dim], fp32, on the CPU
    vecs, n_tokens = embed_with_usage(model, inputs)

`Model.extra` holds what sentence-transformers keeps in its module folders, as plain data (read by
llmfn.loading.sentence_transformers, whose load_embedding_model this module re-exports): pooling modes,
normalize, max_seq_length, do_lower_case and the ids wrapped around each text ([CLS] ... [SEP]).

Inputs are strings or token id lists (text tokens without [CLS]/[SEP]; those are added like for text).
Special-token strings in user text stay text: "[SEP]" is encoded as "[", "sep", "]". This differs from
sentence-transformers, whose Hugging Face tokenizer turns "[SEP]" or "[MASK]" in the text into the special
id; llmfn keeps its rule that user text never becomes control tokens (as OpenAI's embeddings endpoint
does for its own special strings). Only texts containing a literal special token string differ.

Batches are sorted by token count and padded per batch; the padding is masked out of attention and
pooling, so a sentence's embedding does not depend on its batch. Usage counts every token the encoder
ran on, [CLS]/[SEP] included, after truncation (as text-embeddings-inference reports it).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmfn.errors import RequestError
from llmfn.loading.sentence_transformers import POOLING_MODES, load_embedding_model
from llmfn.model import Model
from llmfn.models import bert

Input = str | Sequence[int] | Sequence[str | Sequence[int]]


# ---------------------------------------------------------------------------------------------- tokenizing

def _as_inputs(inputs: Input) -> list:
    if isinstance(inputs, str):
        return [inputs]
    if not isinstance(inputs, Sequence):
        raise RequestError(f"input must be a string or a list, not {type(inputs).__name__}", param="input")
    items = list(inputs)
    if items and all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        return [items]  # one token id list
    return items


def tokenize(model: Model, inputs: Input, max_length: int | None = -1) -> list[list[int]]:
    """Encoder ids per input: [CLS] + text tokens + [SEP], cut to max_length ids in all by dropping
    text tokens from the end (-1: the model's max_seq_length, as sentence-transformers; None: uncut)."""
    ex = model.extra
    items = _as_inputs(inputs)
    prefix, suffix = list(ex["prefix_ids"]), list(ex["suffix_ids"])
    max_length = ex["max_seq_length"] if max_length == -1 else max_length
    budget = None if max_length is None else max(max_length - len(prefix) - len(suffix), 0)
    texts = {}
    for i, item in enumerate(items):
        if isinstance(item, str):
            texts[i] = item.lower() if ex["do_lower_case"] else item
        elif isinstance(item, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            if any(t < 0 or t >= model.cfg.vocab_size for t in item):
                raise RequestError(f"input[{i}]: token id out of range [0, {model.cfg.vocab_size})", param="input")
        else:
            raise RequestError(f"input[{i}] must be a string or a list of token ids", param="input")
    # Tokenizer.encode_batch: plain text (special strings stay text), no padding or truncation
    text_ids = dict(zip(texts, model.tokenizer.encode_batch(list(texts.values())), strict=True))
    return [prefix + list(text_ids.get(i, item))[:budget] + suffix for i, item in enumerate(items)]


# ---------------------------------------------------------------------------------------------- pooling


def pool(hidden: torch.Tensor, lengths: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """Sentence vectors [B, D * len(modes)] from right-padded hidden states [B, T, D] whose row b
    holds lengths[b] real tokens; the math of sentence-transformers' Pooling module."""
    B, T, D = hidden.shape
    keep = torch.arange(T, device=hidden.device)[None, :] < lengths[:, None]  # [B, T]
    mask = keep.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    count = lengths.to(hidden.dtype)[:, None]  # [B, 1]
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1))
        elif mode == "mean":
            out.append((hidden * mask).sum(dim=1) / count.clamp(min=1e-9))
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * mask).sum(dim=1) / count.clamp(min=1e-9).sqrt())
        elif mode == "weightedmean":
            w = mask * torch.arange(1, T + 1, device=hidden.device, dtype=hidden.dtype)[None, :, None]  # [B, T, 1]
            out.append((hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            out.append(hidden[torch.arange(B, device=hidden.device), lengths - 1])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)


# ---------------------------------------------------------------------------------------------- embedding


SPLIT_MIN_TOKENS = 32  # below this, one more forward costs more than the padding it saves


def batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped longest first into batches of at most batch_size rows. A batch also ends
    where the next row is under half its longest (once that is >= SPLIT_MIN_TOKENS), so a short
    text is never padded to more than twice its length by a long one."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if out and len(out[-1]) < batch_size:
            longest = lengths[out[-1][0]]
            if longest < SPLIT_MIN_TOKENS or 2 * lengths[i] >= longest:
                out[-1].append(i)
                continue
        out.append([i])
    return out


@torch.inference_mode()
def embed_ids(model: Model, seqs: list[list[int]], *, normalize: bool | None = None, batch_size: int = 32) -> torch.Tensor:
    """Embeddings [n, dim] (fp32, CPU) of full encoder id lists, in input order. Batches (see
    `batches`) are taken longest first and padded only to their own longest row."""
    if batch_size < 1:
        raise RequestError("batch_size must be >= 1", param="batch_size")
    ex, cfg = model.extra, model.cfg
    normalize = ex["normalize"] if normalize is None else normalize
    device = model.params["tok_embed"].device
    out = torch.empty(len(seqs), cfg.dim * len(ex["pooling"]), dtype=torch.float32)
    for idx in batches([len(s) for s in seqs], batch_size):
        lens = [len(seqs[i]) for i in idx]
        T = lens[0]
        tokens = torch.tensor([seqs[i] + [cfg.pad_id] * (T - len(seqs[i])) for i in idx], dtype=torch.long)
        lengths = torch.tensor(lens)
        mask = None if lens[-1] == T else torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
        hidden = bert.forward(model.params, cfg, tokens.to(device), None if mask is None else mask.to(device),
                              skip_padding=True)  # pooling reads the real positions only
        vecs = pool(hidden.float(), lengths.to(device), ex["pooling"])  # [B, dim]
        if normalize:
            vecs = F.normalize(vecs, p=2, dim=-1)
        out[torch.tensor(idx)] = vecs.cpu()
    return out


def embed_with_usage(
    model: Model, inputs: Input, *, normalize: bool | None = None, batch_size: int = 32
) -> tuple[torch.Tensor, int]:
    """(embeddings [n, dim] fp32 on the CPU, tokens run through the encoder incl. [CLS]/[SEP]).
    inputs: a string, a list of strings, a token id list or a list of token id lists."""
    if model.kind != "embedding":
        raise RequestError(f"model {model.path} is a {model.kind} model, not an embedding model", param="model")
    seqs = tokenize(model, inputs)
    return embed_ids(model, seqs, normalize=normalize, batch_size=batch_size), sum(map(len, seqs))


def embed(model: Model, inputs: Input, *, normalize: bool | None = None, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [n, dim] (fp32, CPU). normalize: None = as the model folder says."""
    return embed_with_usage(model, inputs, normalize=normalize, batch_size=batch_size)[0]


def to_base64(vectors: torch.Tensor) -> list[str]:
    """One base64 string per row: little-endian float32 bytes (OpenAI's encoding_format="base64")."""
    rows = vectors.detach().to(torch.float32).cpu().numpy().astype("<f4")
    return [base64.b64encode(r.tobytes()).decode("ascii") for r in rows]


__all__ = [
    "POOLING_MODES", "batches", "embed", "embed_ids",
    "embed_with_usage", "load_embedding_model", "pool", "to_base64", "tokenize",
]  # fmt: skip
