"""POST /v1/embeddings: sentence embeddings of up to MAX_EMBEDDING_INPUTS texts or token id lists,
computed on the model pool's thread and answered as floats or base64 (little-endian float32)."""

from __future__ import annotations

import asyncio
import base64

from llmfn.errors import LlmfnError
from llmfn.serve import access_log
from llmfn.serve import schemas as s
from llmfn.serve.http import ApiError, Request, Response
from llmfn.serve.metrics import Metrics
from llmfn.serve.models import ModelPool, Served
from llmfn.serve.requests import engine_error, listed

MAX_EMBEDDING_INPUTS = 2048


async def embeddings(pool: ModelPool, metrics: Metrics, req: Request):
    body = req.decode(s.EmbeddingRequest)
    served = pool.get(body.model, "embedding")
    inputs = _inputs(body.input, served.model.cfg.vocab_size)
    size = dim(served)
    if body.dimensions is not None and body.dimensions != size:
        raise ApiError(
            400,
            f"dimensions must be {size} for {served.name!r} (it cannot be changed)",
            param="dimensions",
        )

    max_length = _max_length(served, body.truncate_prompt_tokens)

    def run():
        from llmfn.embed import embed_ids, tokenize

        seqs = tokenize(served.model, inputs, max_length)
        if body.truncate_prompt_tokens is None:
            _check_lengths(seqs, served.context_length)
        return embed_ids(served.model, seqs), sum(map(len, seqs))

    try:
        vectors, n_tokens = await asyncio.wrap_future(pool.run(run))
    except LlmfnError as e:
        raise engine_error(e) from None
    metrics.prompt_tokens.inc(n_tokens, model=served.name)
    access_log.note(served.name, prompt_tokens=n_tokens)
    if body.encoding_format == "base64":
        rows = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        rows = vectors.tolist()
    data = [s.Embedding(i, row) for i, row in enumerate(rows)]
    return Response.json(
        s.EmbeddingList(data, body.model or served.name, s.EmbeddingUsage(n_tokens, n_tokens))
    )


def _inputs(value, vocab: int):
    items = listed(value, "input", MAX_EMBEDDING_INPUTS)
    for i, item in enumerate(items):
        if len(item) == 0:
            raise ApiError(400, f"input[{i}] is empty", param="input")
        if not isinstance(item, str) and any(not 0 <= t < vocab for t in item):
            raise ApiError(400, f"input[{i}]: token ids must be in [0, {vocab})", param="input")
    return value if isinstance(value, str) else items


def _max_length(served: Served, truncate: int | None) -> int | None:
    """The ids kept per input, [CLS]/[SEP] included: all (checked against the model's limit) unless
    the request asks for truncation with vLLM's truncate_prompt_tokens (-1: the model's limit; the
    special ids stay however small it is)."""
    if truncate is None:
        return None
    limit = served.context_length
    if truncate == -1:
        return limit
    if not 1 <= truncate <= limit:
        raise ApiError(400, f"truncate_prompt_tokens must be -1 or in [1, {limit}] for {served.name!r}",
                       param="truncate_prompt_tokens")  # fmt: skip
    return truncate


def _check_lengths(seqs: list[list[int]], limit: int) -> None:
    for i, seq in enumerate(seqs):
        if len(seq) > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; input[{i}] has {len(seq)} "
                                "tokens (set truncate_prompt_tokens to cut inputs to the limit)",
                           param="input", code="context_length_exceeded")  # fmt: skip


def dim(served: Served) -> int:
    """The length of the model's vectors: its hidden size times the number of poolings concatenated."""
    cfg = served.model.cfg
    return int(getattr(cfg, "dim", getattr(cfg, "hidden_size", 0))) * len(
        served.model.extra.get("pooling", ("mean",))
    )
