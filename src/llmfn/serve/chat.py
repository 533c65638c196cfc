"""POST /v1/chat/completions: messages rendered with the model's chat template, then n generations,
answered whole or as server-sent chunks; tools and output constraints as OpenAI defines them.

Tools (llmfn.tools): offered tools are rendered into the prompt (through the template when it takes
them, else in the Hermes format); with tool_choice "required" or a named function the output is
constrained to calls, with "auto" the model may call or answer. Calls are parsed out of the text into
`tool_calls` (finish_reason "tool_calls"); streamed, text that may start a call is held back until it
is known, and each call is sent as OpenAI streams them: id, type and name first, then the arguments."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from msgspec import UNSET

from llmfn import constraints, tools
from llmfn.chat_template import apply_chat_template
from llmfn.serve import generation as gen
from llmfn.serve import schemas as s
from llmfn.serve.config import Limits
from llmfn.serve.http import ApiError, Request, Response, StreamingResponse, sse
from llmfn.serve.logprobs import token_logprobs
from llmfn.serve.metrics import Metrics, Tracking
from llmfn.serve.models import ModelPool
from llmfn.serve.requests import message_dict, request_error


@dataclass(frozen=True)
class ToolUse:
    """The tools of a request that may call them: their OpenAI dicts, names, and the grammar that
    forces calls (tool_choice "required" or a named function; None for "auto")."""

    tools: list[dict]
    names: frozenset[str]
    grammar: str | None


def tool_use(body: s.ChatCompletionRequest) -> ToolUse | None:
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    offered = [msgspec.to_builtins(t) for t in body.tools]
    specs = request_error(lambda: tools.functions(offered))
    name = choice.function.name if isinstance(choice, s.NamedToolChoice) else None
    grammar = None
    if choice == "required" or name is not None:
        grammar = request_error(lambda: tools.call_grammar(offered, name, body.parallel_tool_calls is not False))
    return ToolUse(offered, frozenset(f["name"] for f in specs), grammar)


@dataclass(frozen=True)
class Prepared:
    """A chat request made ready for the engine: its model, tool use and one request per choice."""

    served: object
    use: ToolUse | None
    requests: list


async def prepare(pool: ModelPool, limits: Limits, body: s.ChatCompletionRequest) -> Prepared:
    """Check a chat body, render its prompt (tools included), compile its constraint off the event
    loop and build its engine requests; every problem is an ApiError naming the param."""
    gen.check_common(body.stream_options, body.stream)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    served = pool.get(body.model, "causal-lm")
    model = served.model
    if not model.chat_template:
        raise ApiError(
            400, f"the model {served.name!r} has no chat template; use /v1/completions", param="model"
        )
    use = tool_use(body)
    messages = [message_dict(m, i) for i, m in enumerate(body.messages)]
    messages, extra = request_error(lambda: tools.render_args(messages, model.chat_template, use and use.tools))
    prompt = request_error(lambda: apply_chat_template(model.tokenizer, model.chat_template, messages, **extra))
    constraint = gen.body_constraint(body)
    if use is not None and use.grammar is not None:
        if constraint is not None:
            raise ApiError(400, f"tool_choice forces a tool call; it cannot be combined with {constraint.param}",
                           param="tool_choice")  # fmt: skip
        constraint = constraints.grammar(use.grammar, param="tool_choice")
    await gen.compiled(served, constraint)
    requested = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    n_new = gen.max_tokens(served, len(prompt), requested, limits.max_tokens, "messages", param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Prepared(served, use, gen.generation_requests(served, prompt, n_new, body, logprobs, constraint))


async def chat_completions(pool: ModelPool, metrics: Metrics, limits: Limits, req: Request):
    body = req.decode(s.ChatCompletionRequest)
    prep = await prepare(pool, limits, body)
    served, use, requests = prep.served, prep.use, prep.requests
    t0 = time.perf_counter()
    streams = await gen.open_all(req, served, requests, body.stream)
    tracks = [Tracking(metrics, served.name, t0) for _ in streams]
    name = body.model or served.name
    cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = _chunks(served, streams, tracks, cid, created, name, include_usage, body.logprobs, use)
        return StreamingResponse(gen.sse_stream(frames, tracks))

    async def collect(i: int):
        evs = await gen.run_to_end(streams[i], tracks[i])
        lp = s.ChoiceLogprobs([x for ev in evs for x in token_logprobs(served, ev)]) if body.logprobs else None
        text, finish = "".join(ev.text for ev in evs), gen.finish(evs[-1])
        content, calls = tools.parse_calls(text, use.names) if use is not None else (text, [])
        if calls and use.grammar is not None:  # forced calls: what follows them is a call cut short
            content = None
        out = [s.ToolCallOut(c.id, s.FunctionCall(c.name, c.arguments)) for c in calls]
        message = s.AssistantMessage("assistant", content, tool_calls=out)
        return s.ChatChoice(i, message, lp, "tool_calls" if calls else finish), evs[-1]

    results = await asyncio.gather(*(collect(i) for i in range(len(streams))))
    usage = gen.sum_usage([last for _, last in results])
    return Response.json(s.ChatCompletion(cid, created, name, [c for c, _ in results], usage))


class _Held:
    """One streamed choice's text while tools may be called: what is surely not part of a call goes
    out at once, the rest waits for the end, where calls are parsed out of the whole text."""

    def __init__(self, use: ToolUse):
        self.use, self.text, self.sent = use, "", 0

    def push(self, text: str) -> str:
        self.text += text
        if self.use.grammar is not None:  # forced calls: no text at all
            return ""
        safe = tools.may_become_call(self.text)
        out, self.sent = self.text[self.sent : max(safe, self.sent)], max(safe, self.sent)
        return out

    def finish(self) -> tuple[str, list[tools.ToolCall]]:
        """(the text not sent yet, the calls) at the end of the choice."""
        outside, calls = tools.split_calls(self.text, self.use.names)
        if not calls:
            return self.text[self.sent :], []
        if self.use.grammar is not None:  # forced calls: what follows them is a call cut short
            return "", calls
        rest = outside[self.sent :]  # what was sent lies before the first call, so outside starts with it
        return (rest.strip() if self.sent == 0 else rest.rstrip()), calls


async def _chunks(served, streams, tracks, cid, created, name, include_usage, want_logprobs, use) -> AsyncIterator[bytes]:
    """The SSE frames of the choices as they come: each one's role, its text (or tool calls), its
    finish reason; the total usage last, when asked for."""
    usage = None if include_usage else UNSET

    def chunk(i: int, delta: s.ChatDelta, finish: str | None = None, logprobs=None) -> bytes:
        choice = s.ChatChunkChoice(i, delta, logprobs, finish)
        return sse(s.ChatCompletionChunk(cid, created, name, [choice], usage=usage))

    held = [_Held(use) if use is not None else None for _ in streams]
    lasts: list = [None] * len(streams)
    for i in range(len(streams)):
        yield chunk(i, s.ChatDelta(role="assistant", content=""))
    async with contextlib.aclosing(gen.each_event(streams, tracks, lasts)) as events:
        async for i, ev in events:
            lp = s.ChoiceLogprobs(token_logprobs(served, ev)) if want_logprobs and ev.token_ids else None
            text = ev.text if held[i] is None else held[i].push(ev.text)
            if text or lp is not None:
                yield chunk(i, s.ChatDelta(content=text), logprobs=lp)
            if ev.finish_reason is None:
                continue
            finish = gen.finish(ev)
            if held[i] is not None:
                rest, calls = held[i].finish()
                if rest:
                    yield chunk(i, s.ChatDelta(content=rest))
                for k, c in enumerate(calls):
                    first = s.ToolCallDelta(k, s.FunctionDelta(name=c.name, arguments=""), id=c.id, type="function")
                    yield chunk(i, s.ChatDelta(tool_calls=[first]))
                    yield chunk(i, s.ChatDelta(tool_calls=[s.ToolCallDelta(k, s.FunctionDelta(arguments=c.arguments))]))
                finish = "tool_calls" if calls else finish
            yield chunk(i, s.ChatDelta(), finish)
        else:
            if include_usage:
                yield sse(s.ChatCompletionChunk(cid, created, name, [], usage=gen.sum_usage(lasts)))
