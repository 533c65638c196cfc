"""What chat and text completions share between a decoded body and the engine: the engine request,
max_tokens against the context, submitting, the event streams (one generation's, several merged),
event errors, usage, and the SSE stream around a route's frames."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator

from llmfn.errors import LlmfnError
from llmfn.sampling import KNOBS, SamplingParams, sampling_params
from llmfn.serve import schemas as s
from llmfn.serve.http import SSE_DONE, ApiError, Request, sse
from llmfn.serve.metrics import Tracking
from llmfn.serve.models import Served
from llmfn.serve.requests import engine_error

log = logging.getLogger("llmfn.serve")

# An unset field takes llmfn.sampling's default, except these: the server answers as OpenAI does.
OPENAI_DEFAULTS = {"temperature": 1.0}


def check_common(n: int | None, stream_options, stream: bool | None) -> None:
    if n not in (None, 1):
        raise ApiError(
            400,
            f"n = {n} is not supported: this server returns one choice per request (n must be 1)",
            param="n",
        )
    if stream_options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")


def request_sampling(body: s.GenerationFields) -> SamplingParams:
    """The body's sampling fields as SamplingParams: unset ones take llmfn.sampling's defaults, except
    OPENAI_DEFAULTS. The ranges were checked when the body was decoded (its types come from KNOBS)."""
    values = {name: getattr(body, name) for name in KNOBS}
    for name, default in OPENAI_DEFAULTS.items():
        if values[name] is None:
            values[name] = default
    return sampling_params(**values)


def generation_request(prompt: list[int], max_tokens: int, body: s.GenerationFields, logprobs: int | None):
    from llmfn.engine import GenerationRequest

    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    kwargs = {"logprobs": logprobs} if logprobs is not None else {}
    return GenerationRequest(
        prompt_ids=list(prompt), max_tokens=max_tokens, sampling=request_sampling(body), stop=stop, **kwargs
    )


def max_tokens(
    served: Served, n_prompt: int, requested: int | None, limit: int, prompt_param: str, param: str
) -> int:
    """The request's max_tokens, checked against the context and the server's limit; when it gives
    none, what the context leaves, capped by the limit (as vLLM does)."""
    context = served.context_length
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", param=prompt_param)
    if requested is None:
        if n_prompt >= context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                f"{n_prompt} tokens, which leaves no room for a completion", param=prompt_param)  # fmt: skip
        return min(context - n_prompt, limit)
    if n_prompt + requested > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has {n_prompt} "
                            f"tokens and {param} asks for {requested} more ({n_prompt + requested} in all)",
                       param=param, code="context_length_exceeded")  # fmt: skip
    if requested > limit:
        raise ApiError(400, f"{param} is {requested}, over this server's limit of {limit}", param=param)
    return requested


async def open_generation(req: Request, served: Served, request):
    """Submit to the engine and wait for its first event, so that a rejected request (bad
    parameter, full queue) is still an HTTP error rather than a broken stream. The iterator is
    registered on req.cleanup: however the request ends, the server closes it (cancelling the
    generation if it still runs). Returns (first event, the rest until a finish_reason)."""
    try:
        events = served.engine.submit(request)
        if inspect.isawaitable(events):
            events = await events
        req.cleanup.append(events)
        first = await anext(events)
    except LlmfnError as e:
        raise engine_error(e) from None
    if event_error(first) is not None:
        raise event_error(first)
    return first, events


def event_error(ev) -> ApiError | None:
    if getattr(ev, "error", None) or ev.finish_reason in ("error", "cancelled"):
        what = "cancelled" if ev.finish_reason == "cancelled" else "failed"
        return ApiError(500 if what == "failed" else 503, f"generation {what}: {ev.error or ev.finish_reason}",
                        code="generation_" + what)  # fmt: skip
    return None


def finish(ev) -> str | None:
    return None if ev is None else ev.finish_reason


def usage(ev) -> s.Usage:
    p, c = (ev.prompt_tokens, ev.completion_tokens) if ev is not None else (0, 0)
    return s.Usage(p, c, p + c)


def sum_usage(events) -> s.Usage:
    p = sum(ev.prompt_tokens for ev in events if ev is not None)
    c = sum(ev.completion_tokens for ev in events if ev is not None)
    return s.Usage(p, c, p + c)


async def aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def chain(first, rest) -> AsyncIterator:
    """The first event, then the rest until a finish_reason; always closes the engine iterator."""
    try:
        yield first
        if first.finish_reason is None:
            async for ev in rest:
                yield ev
                if ev.finish_reason is not None:
                    break
    finally:
        await aclose(rest)


async def run_to_end(events: AsyncIterator, track: Tracking) -> list:
    """Every event of one generation, for an answer that is not streamed; an error event raises."""
    out = []
    try:
        async for ev in events:
            track.event(ev)
            if (error := event_error(ev)) is not None:
                raise error
            out.append(ev)
    finally:
        track.close()
    return out


async def merge(streams: list) -> AsyncIterator[tuple[int, object]]:
    """(index, event) from several event streams as they arrive."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for ev in only:
                yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i, stream):
        try:
            async for ev in stream:
                await queue.put((i, ev))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await aclose(stream)
            await queue.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is end:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sse_stream(frames: AsyncIterator[bytes], tracks: list[Tracking]) -> AsyncIterator[bytes]:
    """A route's SSE frames, then data: [DONE]. The status line is sent by then, so a failure midway
    is an error event; the generations' metrics are recorded however the stream ends."""
    try:
        async with contextlib.aclosing(frames) as inner:
            async for frame in inner:
                yield frame
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as e:
        log.exception("stream failed")
        yield sse(ApiError(500, f"generation failed: {e}", code="internal_error").body())
    finally:
        for track in tracks:
            track.close()
    yield SSE_DONE
