"""POST /v1/responses: OpenAI's Responses API for one model turn, on top of the chat route.

The input (text, or a list of messages, function_call and function_call_output items), instructions,
function tools, tool_choice and text.format are translated into a chat request and run the same way
(prompt, tools, constraints, engine); the answer comes back as a `response` object, or streamed as
its events (response.created ... response.completed). No state is kept on the server: `store` is
ignored and previous_response_id is refused, so a conversation is sent whole each turn."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator

import msgspec

from llmfn import tools
from llmfn.sampling import KNOBS
from llmfn.serve import generation as gen
from llmfn.serve import schemas as s
from llmfn.serve.chat import prepare
from llmfn.serve.config import Limits
from llmfn.serve.http import ApiError, Request, Response, StreamingResponse, sse
from llmfn.serve.metrics import Metrics, Tracking
from llmfn.serve.models import ModelPool


async def responses(pool: ModelPool, metrics: Metrics, limits: Limits, req: Request):
    body = req.decode(s.ResponsesRequest)
    if body.previous_response_id is not None:
        raise ApiError(400, "previous_response_id is not supported: this server keeps no state; send the whole "
                            "conversation as input", param="previous_response_id")  # fmt: skip
    prep = await prepare(pool, limits, chat_request(body))
    rid, created = "resp_" + secrets.token_hex(12), time.time()
    t0 = time.perf_counter()
    [events] = await gen.open_all(req, prep.served, prep.requests[:1], body.stream)
    track = Tracking(metrics, prep.served.name, t0)
    head = _response(rid, created, body, prep.served.name, "in_progress", [], None)
    if body.stream:
        return StreamingResponse(gen.sse_stream(_events(events, track, head, prep.use), [track]))
    evs = await gen.run_to_end(events, track)
    said, calls = _split("".join(ev.text for ev in evs), prep.use, 0)
    return Response.json(_finished(head, _items(said, calls), evs[-1]))


def chat_request(body: s.ResponsesRequest) -> s.ChatCompletionRequest:
    """The chat request a Responses body stands for."""
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + _messages(body.input)
    chat = {"messages": messages, "model": body.model, "max_tokens": body.max_output_tokens,
            "stream": body.stream, "parallel_tool_calls": body.parallel_tool_calls,
            **{name: getattr(body, name) for name in KNOBS}}  # fmt: skip
    if body.tools:
        chat["tools"] = [_tool(t, i) for i, t in enumerate(body.tools)]
    if body.tool_choice is not None:
        choice = body.tool_choice
        chat["tool_choice"] = ({"type": "function", "function": {"name": choice.get("name")}}
                               if isinstance(choice, dict) else choice)  # fmt: skip
    fmt = (body.text or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(400, "text.format.type must be text, json_object or json_schema", param="text.format")
        chat["response_format"] = {"type": fmt["type"]} if fmt["type"] != "json_schema" else {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")},
        }
    try:
        return msgspec.convert({k: v for k, v in chat.items() if v is not None}, s.ChatCompletionRequest)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"input: {e}", param="input") from None


def _messages(items) -> list[dict]:
    """Responses input items as chat messages (function calls folded into assistant tool_calls)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(400, f"input[{i}] must be an object", param=f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": _text(item.get("content"), i)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}  # fmt: skip
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else msgspec.json.encode(output).decode()})  # fmt: skip
        else:
            raise ApiError(400, f"input[{i}]: item type {kind!r} is not supported (message, function_call, "
                                "function_call_output are)", param=f"input[{i}].type")  # fmt: skip
    return out


def _text(content, i: int):
    if isinstance(content, str) or content is None:
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise ApiError(400, f"input[{i}].content[{j}]: only text parts are supported",
                               param=f"input[{i}].content[{j}]")  # fmt: skip
            text = part.get("text", "")
            if not isinstance(text, str):
                raise ApiError(400, f"input[{i}].content[{j}].text must be a string", param=f"input[{i}].content[{j}].text")
            parts.append(text)
        return "\n".join(parts)
    raise ApiError(400, f"input[{i}].content must be a string or a list of parts", param=f"input[{i}].content")


def _tool(tool: dict, i: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ApiError(400, f"tools[{i}]: only function tools are supported", param=f"tools[{i}]")
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _split(text: str, use, sent: int) -> tuple[str, list]:
    """(the message text, the calls) of a turn's output; `sent` characters of it already went out."""
    outside, calls = tools.split_calls(text, use.names) if use is not None else (text, [])
    if calls and use.grammar is not None:  # forced calls: what follows them is a call cut short
        return "", calls
    return (outside if not calls else outside.strip() if sent == 0 else outside.rstrip()), calls


def _items(said: str, calls: list, mid: str | None = None, opened: bool = False) -> list[dict]:
    """The output items of a finished turn: the assistant message (unless only calls were made and no
    text was streamed), then the function calls."""
    items = [{"type": "function_call", "id": "fc_" + secrets.token_hex(12), "call_id": c.id, "name": c.name,
              "arguments": c.arguments, "status": "completed"} for c in calls]  # fmt: skip
    return ([_message(said, mid=mid)] if said or opened or not calls else []) + items


def _message(text: str, status: str = "completed", mid: str | None = None) -> dict:
    return {"type": "message", "id": mid or "msg_" + secrets.token_hex(12), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip


def _response(rid, created, body, model, status, output, usage) -> dict:
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": body.model or model,
        "output": output, "usage": usage, "error": None, "incomplete_details": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "temperature": body.temperature, "top_p": body.top_p, "text": body.text or {"format": {"type": "text"}},
        "metadata": body.metadata or {}, "store": False, "previous_response_id": None,
    }  # fmt: skip


def _finished(head: dict, output: list[dict], last) -> dict:
    p, c = last.prompt_tokens, last.completion_tokens
    usage = {"input_tokens": p, "output_tokens": c, "total_tokens": p + c,
             "input_tokens_details": {"cached_tokens": last.cached_tokens}, "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
    length = last.finish_reason == "length"
    return {**head, "output": output, "usage": usage, "status": "incomplete" if length else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if length else None}  # fmt: skip


async def _events(events, track, head: dict, use) -> AsyncIterator[bytes]:
    """The streamed turn: response.created, the message's text deltas as they come (held back where a
    tool call may start), then each output item done, and response.completed."""
    seq = itertools.count()

    def event(kind: str, **fields) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    yield event("response.created", response=head)
    yield event("response.in_progress", response=head)
    mid, text, sent, opened, last = "msg_" + secrets.token_hex(12), "", 0, False, None
    async for ev in events:
        track.event(ev)
        if (error := gen.event_error(ev)) is not None:
            yield event("error", code=error.code or "error", message=error.message, param=None)
            return
        last, text = ev, text + ev.text
        safe = len(text) if use is None else (tools.may_become_call(text) if use.grammar is None else 0)
        if safe > sent:
            if not opened:
                opened = True
                yield event("response.output_item.added", output_index=0, item=_message("", "in_progress", mid))
                yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})  # fmt: skip
            yield event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                        delta=text[sent:safe], logprobs=[])  # fmt: skip
            sent = safe
    said, calls = _split(text, use, sent)
    output = _items(said, calls, mid, opened)
    for index, item in enumerate(output):
        if item["type"] == "message":
            if not opened:
                yield event("response.output_item.added", output_index=0, item=_message("", "in_progress", mid))
                yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})  # fmt: skip
            if said[sent:]:
                yield event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                            delta=said[sent:], logprobs=[])  # fmt: skip
            yield event("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=said,
                        logprobs=[])  # fmt: skip
            yield event("response.content_part.done", item_id=mid, output_index=0, content_index=0,
                        part=item["content"][0])  # fmt: skip
        else:
            yield event("response.output_item.added", output_index=index,
                        item={**item, "arguments": "", "status": "in_progress"})  # fmt: skip
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=item["arguments"])  # fmt: skip
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=item["arguments"], name=item["name"])  # fmt: skip
        yield event("response.output_item.done", output_index=index, item=item)
    yield event("response.completed", response=_finished(head, output, last))
