"""What chat and text completions share between a decoded body and the engine: the engine request,
max_tokens against the context, submitting, the event streams (one generation's, several merged),
event errors, usage, and the SSE stream around a route's frames."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator

from llmfn import constraints
from llmfn.errors import LlmfnError, RequestError
from llmfn.sampling import KNOBS, SamplingParams
from llmfn.serve import schemas as s
from llmfn.serve.http import SSE_DONE, ApiError, Request, sse
from llmfn.serve.metrics import Tracking
from llmfn.serve.models import Served
from llmfn.serve.requests import engine_error, request_error

log = logging.getLogger("llmfn.serve")

CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def check_common(stream_options, stream: bool | None) -> None:
    if stream_options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")


def body_constraint(body: s.GenerationFields) -> constraints.Constraint | None:
    """The one output constraint a body asks for: response_format or one of vLLM's guided_* fields.
    Its kind is checked here; whether the schema / regex / grammar compiles, where it is compiled."""
    given = [name for name in CONSTRAINT_FIELDS if getattr(body, name) is not None]
    fmt = body.response_format
    if fmt is not None and fmt.type == "text":
        given.remove("response_format")
    if len(given) > 1:
        raise ApiError(400, f"only one output constraint per request, got {', '.join(given)}", param=given[1])
    if not given:
        return None
    name = given[0]
    value = getattr(body, name)
    with_param = {"param": name}
    if name == "response_format":
        if fmt.type == "json_object":
            return constraints.json_object(**with_param)
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return request_error(lambda: constraints.json_schema(_strict(fmt.json_schema), **with_param))
    build = {"guided_json": constraints.json_schema, "guided_regex": constraints.regex,
             "guided_choice": constraints.choice, "guided_grammar": constraints.grammar}[name]  # fmt: skip
    return request_error(lambda: build(value, **with_param))


def _strict(spec: s.JsonSchemaFormat) -> dict:
    """OpenAI's strict mode: objects take no properties beyond the schema's."""
    if not spec.strict:
        return spec.schema

    def close(node):
        if isinstance(node, dict):
            out = {k: close(v) for k, v in node.items()}
            if out.get("type") == "object" and "additionalProperties" not in out:
                out["additionalProperties"] = False
            return out
        return [close(v) for v in node] if isinstance(node, list) else node

    return close(spec.schema)


async def compiled(served: Served, constraint: constraints.Constraint | None) -> None:
    """Compile (and cache) a constraint off the event loop and the engine's loop: the engine then finds
    it compiled. An invalid one is a 400 naming its field."""
    if constraint is not None:
        try:
            await asyncio.to_thread(constraints.compile, constraint, served.model.tokenizer)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param) from None


def request_sampling(served: Served, body: s.GenerationFields, seed: int | None = None) -> SamplingParams:
    """The body's sampling fields as SamplingParams: unset ones take the model's defaults (then
    llmfn.sampling's); `seed` overrides the body's (choice i of n samples with seed + i). The ranges
    were checked when the body was decoded (its types come from KNOBS)."""
    given = {name: getattr(body, name) for name in KNOBS}
    if seed is not None:
        given["seed"] = seed
    return request_error(lambda: served.model.generation.sampling(**given))


def generation_requests(served: Served, prompt: list[int], max_tokens: int, body: s.GenerationFields,
                        logprobs: int | None, constraint=None) -> list:
    """The body's n generations of one prompt (n choices): the same request but for the seed, seed + i
    when the body gives one (else a fresh seed each). The engine's prefix cache shares their prompt."""
    from llmfn.engine import GenerationRequest

    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    kwargs = {"logprobs": logprobs} if logprobs is not None else {}
    n = body.n or 1
    seeds = [None if body.seed is None else (body.seed + i + 2**63) % 2**64 - 2**63 for i in range(n)]
    return [GenerationRequest(prompt_ids=list(prompt), max_tokens=max_tokens,
                              sampling=request_sampling(served, body, seed), stop=stop,
                              logit_bias=body.logit_bias, constraint=constraint, **kwargs)
            for seed in seeds]  # fmt: skip


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


async def submit(req: Request, served: Served, request):
    """Submit to the engine; a rejected request (bad parameter, full queue) is an HTTP error. The
    iterator is registered on req.cleanup: however the request ends, the server closes it (cancelling
    the generation if it still runs). A stream starts on this (its first event may wait in the queue)."""
    try:
        events = served.engine.submit(request)
        if inspect.isawaitable(events):
            events = await events
    except LlmfnError as e:
        raise engine_error(e) from None
    req.cleanup.append(events)
    return events


async def open_generation(req: Request, served: Served, request):
    """Submit and wait for the first event, so that a request that fails at once is still an HTTP
    error (for answers that are not streamed). Returns (first event, the rest until a finish_reason)."""
    events = await submit(req, served, request)
    try:
        first = await anext(events)
    except LlmfnError as e:
        raise engine_error(e) from None
    if event_error(first) is not None:
        raise event_error(first)
    return first, events


async def open_all(req: Request, served: Served, requests: list, stream: bool | None) -> list[AsyncIterator]:
    """Each request's events (req.cleanup closes them all, however the request ends). A stream's
    response starts once they are queued; an answer that is not streamed waits for the first events."""
    if stream:
        return [chain(None, await submit(req, served, r)) for r in requests]
    return [chain(*await open_generation(req, served, r)) for r in requests]


def event_error(ev) -> ApiError | None:
    if getattr(ev, "error", None) or ev.finish_reason in ("error", "cancelled"):
        what = "cancelled" if ev.finish_reason == "cancelled" else "failed"
        return ApiError(500 if what == "failed" else 503, f"generation {what}: {ev.error or ev.finish_reason}",
                        code="generation_" + what)  # fmt: skip
    return None


def finish(ev) -> str | None:
    return None if ev is None else ev.finish_reason


def usage(ev) -> s.Usage:
    p, c, cached = (ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens) if ev is not None else (0, 0, 0)
    return s.Usage(p, c, p + c, s.PromptTokensDetails(cached))


def sum_usage(events) -> s.Usage:
    p = sum(ev.prompt_tokens for ev in events if ev is not None)
    c = sum(ev.completion_tokens for ev in events if ev is not None)
    cached = sum(ev.cached_tokens for ev in events if ev is not None)
    return s.Usage(p, c, p + c, s.PromptTokensDetails(cached))


async def aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def chain(first, rest) -> AsyncIterator:
    """The first event (when already read), then the rest until a finish_reason; always closes the
    engine iterator."""
    try:
        if first is not None:
            yield first
        if first is None or first.finish_reason is None:
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


async def each_event(streams: list, tracks: list[Tracking], lasts: list) -> AsyncIterator[tuple[int, object]]:
    """(choice index, event) from the choices' streams as they come, each recorded in its choice's
    metrics and as its last event; an event that reports an error raises it (sse_stream sends it)."""
    async with contextlib.aclosing(merge(streams)) as merged:
        async for i, ev in merged:
            tracks[i].event(ev)
            lasts[i] = ev
            if (error := event_error(ev)) is not None:
                raise error
            yield i, ev


async def sse_stream(frames: AsyncIterator[bytes], tracks: list[Tracking]) -> AsyncIterator[bytes]:
    """A route's SSE frames, then data: [DONE]. The status line is sent by then, so a failure midway
    is an error event; the generations' metrics are recorded however the stream ends."""
    try:
        async with contextlib.aclosing(frames) as inner:
            async for frame in inner:
                yield frame
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except ApiError as e:  # a generation that failed or was cancelled midway
        yield sse(e.body())
    except Exception as e:
        log.exception("stream failed")
        yield sse(ApiError(500, f"generation failed: {e}", code="internal_error").body())
    finally:
        for track in tracks:
            track.close()
    yield SSE_DONE
