"""What several routes share in reading a request body (already decoded into its schema struct by
`Request.decode`): chat messages as chat-template input, prompt / input lists, and the errors of the
layers below as OpenAI-shaped 4xx answers naming the param."""

from __future__ import annotations

from llmfn.errors import LlmfnError, RequestError
from llmfn.serve import schemas as s
from llmfn.serve.http import ApiError


def request_error(fn):
    """fn(), with a RequestError (a bad request found below the server) answered as a 400."""
    try:
        return fn()
    except RequestError as e:
        raise ApiError(400, str(e), param=e.param) from None


def engine_error(e: LlmfnError) -> ApiError:
    """An engine's refusal as an HTTP error: a full queue is a 429 with retry-after, the rest 400s."""
    if type(e).__name__ == "QueueFullError":
        retry = str(getattr(e, "retry_after", 1)).encode()
        return ApiError(429, f"the server is busy: {e}", code="queue_full", headers=[(b"retry-after", retry)])
    if isinstance(e, RequestError):
        return ApiError(400, str(e), param=e.param)
    return ApiError(400, str(e))


def message_dict(m: s.ChatMessage, i: int) -> dict:
    """messages[i] as the chat template takes it: text parts joined, "developer" read as "system", an
    assistant's tool calls and a tool result's call id kept (llmfn.tools renders them)."""
    content = m.content
    if content is None:
        if m.role != "assistant":
            raise ApiError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
        content = ""
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"content part type {part.type!r} is not supported (only 'text' parts)",
                               param=f"messages[{i}].content[{j}].type")  # fmt: skip
            texts.append(part.text)
        content = "\n".join(texts)
    out = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if isinstance(m, s.AssistantTurn) and m.tool_calls:
        out["tool_calls"] = [{"id": c.id or f"call_{i}_{j}", "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for j, c in enumerate(m.tool_calls)]  # fmt: skip
    if isinstance(m, s.ToolMessage):
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def listed(value, param: str, limit: int) -> list:
    """A string, a token id list, a list of strings or a list of token id lists, as a list of items
    (at most `limit`); anything else is a 400 naming `param`."""
    if isinstance(value, str):
        items = [value]
    elif not value:
        raise ApiError(400, f"{param} is an empty list", param=param)
    elif all(isinstance(v, int) for v in value):
        items = [value]
    elif all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value):
        items = value
    else:
        raise ApiError(400, f"{param} must be a string, a list of strings, a list of token ids or a list of token id lists",
                       param=param)  # fmt: skip
    if len(items) > limit:
        raise ApiError(400, f"at most {limit} {param}s per request", param=param)
    return items
