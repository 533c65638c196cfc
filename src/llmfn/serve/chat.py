"""POST /v1/chat/completions: messages rendered with the model's chat template, then one generation,
answered whole or as server-sent chunks."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator

from msgspec import UNSET

from llmfn.chat_template import apply_chat_template
from llmfn.serve import generation as gen
from llmfn.serve import schemas as s
from llmfn.serve.config import Limits
from llmfn.serve.http import ApiError, Request, Response, StreamingResponse, sse
from llmfn.serve.logprobs import token_logprobs
from llmfn.serve.metrics import Metrics, Tracking
from llmfn.serve.models import ModelPool
from llmfn.serve.requests import message_dict, request_error


async def chat_completions(pool: ModelPool, metrics: Metrics, limits: Limits, req: Request):
    body = req.decode(s.ChatCompletionRequest)
    gen.check_common(body.n, body.stream_options, body.stream)
    if body.tools:
        raise ApiError(400, "tools are not supported by this server", param="tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise ApiError(
            400,
            f"response_format {body.response_format.type!r} is not supported (only 'text')",
            param="response_format",
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    served = pool.get(body.model, "causal-lm")
    model = served.model
    if not model.chat_template:
        raise ApiError(
            400, f"the model {served.name!r} has no chat template; use /v1/completions", param="model"
        )
    messages = [message_dict(m, i) for i, m in enumerate(body.messages)]
    prompt = request_error(lambda: apply_chat_template(model.tokenizer, model.chat_template, messages))
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    n_new = gen.max_tokens(served, len(prompt), requested, limits.max_tokens, "messages", param)
    request = gen.generation_request(prompt, n_new, body, (body.top_logprobs or 0) if body.logprobs else None)
    t0 = time.perf_counter()
    first, events = await gen.open_generation(req, served, request)
    track = Tracking(metrics, served.name, t0)
    name = body.model or served.name
    cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _chunks(
            served, gen.chain(first, events), track, cid, created, name, include_usage, body.logprobs
        )
        return StreamingResponse(gen.sse_stream(frames, [track]))
    evs = await gen.run_to_end(gen.chain(first, events), track)
    logprobs = (
        s.ChoiceLogprobs([lp for ev in evs for lp in token_logprobs(served, ev)]) if body.logprobs else None
    )
    message = s.AssistantMessage("assistant", "".join(ev.text for ev in evs))
    choice = s.ChatChoice(0, message, logprobs, gen.finish(evs[-1]))
    return Response.json(s.ChatCompletion(cid, created, name, [choice], gen.usage(evs[-1])))


async def _chunks(
    served, events, track, cid, created, name, include_usage, want_logprobs
) -> AsyncIterator[bytes]:
    """The SSE frames of one chat generation: the role, then the text as it comes, then the finish
    reason (and the usage, when asked for)."""
    usage = None if include_usage else UNSET

    def chunk(delta: s.ChatDelta, finish: str | None = None, logprobs=None) -> bytes:
        choice = s.ChatChunkChoice(0, delta, logprobs, finish)
        return sse(s.ChatCompletionChunk(cid, created, name, [choice], usage=usage))

    yield chunk(s.ChatDelta(role="assistant", content=""))
    async for ev in events:
        track.event(ev)
        if (error := gen.event_error(ev)) is not None:
            yield sse(error.body())
            break
        lp = s.ChoiceLogprobs(token_logprobs(served, ev)) if want_logprobs and ev.token_ids else None
        if ev.text or lp is not None:
            yield chunk(s.ChatDelta(content=ev.text), logprobs=lp)
        if ev.finish_reason is not None:
            yield chunk(s.ChatDelta(), gen.finish(ev))
            if include_usage:
                yield sse(s.ChatCompletionChunk(cid, created, name, [], usage=gen.usage(ev)))
