"""POST /v1/completions: n generations per prompt (text or token ids, up to MAX_PROMPTS), run side
by side and answered whole or as server-sent chunks tagged with each choice's index (prompt i's
choice j is index i * n + j, as OpenAI numbers them)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator

from msgspec import UNSET

from llmfn.serve import generation as gen
from llmfn.serve import schemas as s
from llmfn.serve.config import Limits
from llmfn.serve.http import ApiError, Request, Response, StreamingResponse, sse
from llmfn.serve.logprobs import CompletionLogprobs
from llmfn.serve.metrics import Metrics, Tracking
from llmfn.serve.models import ModelPool, Served
from llmfn.serve.requests import listed

MAX_PROMPTS = 64


async def completions(pool: ModelPool, metrics: Metrics, limits: Limits, req: Request):
    body = req.decode(s.CompletionRequest)
    gen.check_common(body.stream_options, body.stream)
    if body.best_of not in (None, 1):
        raise ApiError(400, "best_of > 1 is not supported", param="best_of")
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    served = pool.get(body.model, "causal-lm")
    prompts = _prompts(served, body.prompt)
    constraint = gen.body_constraint(body)
    await gen.compiled(served, constraint)
    requests = []
    for ids in prompts:
        n_new = gen.max_tokens(served, len(ids), body.max_tokens, limits.max_tokens, "prompt", "max_tokens")
        requests += gen.generation_requests(served, ids, n_new, body, body.logprobs, constraint)
    prompts = [ids for ids in prompts for _ in range(body.n or 1)]  # one per choice
    t0 = time.perf_counter()
    streams = await gen.open_all(req, served, requests, body.stream)
    tracks = [Tracking(metrics, served.name, t0) for _ in streams]
    name = body.model or served.name
    cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    echoes = [served.model.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _chunks(served, streams, tracks, echoes, cid, created, name, include_usage, body.logprobs)
        return StreamingResponse(gen.sse_stream(frames, tracks))

    async def collect(i: int):
        evs = await gen.run_to_end(streams[i], tracks[i])
        lp, offset = None, len(echoes[i])
        if body.logprobs is not None:
            lp = CompletionLogprobs(served)
            for ev in evs:
                lp.add(ev, offset)
                offset += len(ev.text)
        text = echoes[i] + "".join(ev.text for ev in evs)
        return s.CompletionChoice(i, text, lp.result() if lp else None, gen.finish(evs[-1])), evs[-1]

    results = await asyncio.gather(*(collect(i) for i in range(len(streams))))
    usage = gen.sum_usage([last for _, last in results])
    return Response.json(s.Completion(cid, created, name, [c for c, _ in results], usage=usage))


async def _chunks(
    served, streams, tracks, echoes, cid, created, name, include_usage, logprobs
) -> AsyncIterator[bytes]:
    """The SSE frames of the prompts' generations as they come: the echoed prompts first, then each
    piece of text and each finish reason under its prompt's index (and the total usage, when asked for)."""
    usage = None if include_usage else UNSET

    def chunk(i: int, text: str, finish: str | None = None, lp=None) -> bytes:
        choice = s.CompletionChoice(i, text, lp, finish)
        return sse(s.Completion(cid, created, name, [choice], usage=usage))

    lasts: list = [None] * len(streams)
    offsets = [len(e) for e in echoes]
    for i, echo in enumerate(echoes):
        if echo:
            yield chunk(i, echo)
    async with contextlib.aclosing(gen.each_event(streams, tracks, lasts)) as events:
        async for i, ev in events:
            lp = None
            if logprobs is not None and ev.token_ids:
                acc = CompletionLogprobs(served)
                acc.add(ev, offsets[i])
                lp = acc.result()
            offsets[i] += len(ev.text)
            if ev.text or lp is not None:
                yield chunk(i, ev.text, lp=lp)
            if ev.finish_reason is not None:
                yield chunk(i, "", gen.finish(ev))
        else:
            if include_usage:
                yield sse(s.Completion(cid, created, name, [], usage=gen.sum_usage(lasts)))


def _prompts(served: Served, prompt) -> list[list[int]]:
    """Token ids per prompt: a string, a list of strings, a token id list or a list of token id lists."""
    vocab = served.model.cfg.vocab_size
    items = listed(prompt, "prompt", MAX_PROMPTS)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = served.model.tokenizer.encode_prompt(item)
        else:
            ids = list(item)
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(
                    400,
                    f"prompt token ids must be in [0, {vocab})",
                    param="prompt" if len(items) == 1 else f"prompt[{i}]",
                )
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt" if len(items) == 1 else f"prompt[{i}]")
        out.append(ids)
    return out
