"""Tool calling: function tools rendered into the prompt, and the model's calls parsed back out.

A chat template that reads a `tools` variable gets the tools as transformers' apply_chat_template
passes them (OpenAI's `{"type": "function", "function": {...}}` list), with assistant `tool_calls`
and `tool` messages as they come. A template without tool support (SmolLM2's, most ChatML ones) gets
llmfn's built-in Hermes format, the one ChatML models are trained on:
- the system message gains the tool signatures inside <tools></tools> and the call format;
- a call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the assistant text
  (past calls in the history are rendered the same way);
- a tool result is a `tool` turn holding `<tool_response>\\n...\\n</tool_response>`.
The output parser reads that call format back, whichever way the prompt was rendered; with
tool_choice "required" or a named function the grammar (`call_grammar`) makes the format certain.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmfn.constraints import JSON_OPTIONS
from llmfn.errors import RequestError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: `arguments` is the JSON text of an object, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@lru_cache(maxsize=16)
def template_takes_tools(template: str) -> bool:
    """Whether a chat template reads a `tools` variable (then it renders tools its own way). Cached:
    parsing is ~1 ms for SmolLM2's 368-character template, per chat request on the server's loop."""
    env = ImmutableSandboxedEnvironment()
    try:
        return "tools" in meta.find_undeclared_variables(env.parse(template))
    except Exception:  # a template jinja cannot parse fails later, where it is rendered
        return False


def functions(tools: list[dict]) -> list[dict]:
    """The function specs ({"name", "description", "parameters"}) of OpenAI tools, checked."""
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"tools[{i}] must be a function tool with a name", param=f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object",
                               param=f"tools[{i}].function.parameters")  # fmt: skip
        out.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    names = [f["name"] for f in out]
    if len(set(names)) != len(names):
        raise RequestError("tool names must be unique", param="tools")
    return out


def render_args(messages: list[dict], template: str, tools: list[dict] | None) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for a chat with tools (None: none offered) or with tool
    calls in its history: as they are, with `tools=`, for a template that takes tools; else in the
    Hermes format."""
    history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if template_takes_tools(template):
        messages = [{**m, "tool_calls": [_native_call(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
                    for m in messages]  # fmt: skip
        return messages, ({"tools": tools} if tools else {})
    if tools or history:
        return hermes_messages(messages, tools or []), {}
    return messages, {}


def _native_call(call: dict) -> dict:
    """A past call for a template: transformers' templates read `arguments` as an object."""
    return {**call, "function": {**call["function"], "arguments": _args(call)}}


def hermes_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages for a template without tool support: tools (if any) in the system message, past calls
    and tool results as text in the Hermes format."""
    out = []
    if tools:
        specs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions(tools))
        system = HERMES_SYSTEM.format(tools=specs)
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"] + "\n\n" + system
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [CALL_OPEN + "\n" + json.dumps({"name": c["function"]["name"], "arguments": _args(c)},
                                                   ensure_ascii=False) + "\n" + CALL_CLOSE
                     for c in m["tool_calls"]]  # fmt: skip
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def _args(call: dict):
    """A past call's arguments as an object (OpenAI sends them as a JSON string)."""
    raw = call["function"].get("arguments") or "{}"
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return raw


def split_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(the text outside the calls, the calls) of a model's output. A block that is not a JSON object
    naming one of `names` with object arguments is left in the text: nothing is invented."""
    calls, kept, pos = [], [], 0
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
        if not isinstance(args, dict) or obj.get("name") not in names:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False)))
    kept.append(text[pos:])
    return "".join(kept), calls


def parse_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(the message content, the calls): with calls, the text around them stripped (None if empty)."""
    outside, calls = split_calls(text, names)
    return ((outside.strip() or None) if calls else text), calls


def call_grammar(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) for output that is only tool calls in the Hermes format:
    one call of `name`, or one or more (`parallel`) calls of any of the tools, arguments valid
    against each function's parameter schema."""
    specs = [f for f in functions(tools) if name is None or f["name"] == name]
    if not specs:
        raise RequestError(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
    one = {"anyOf": [_call_schema(f) for f in specs]} if len(specs) > 1 else _call_schema(specs[0])
    one["x-guidance"] = JSON_OPTIONS  # one-line JSON, as for response_format (see llmfn.constraints)
    repeat = "+" if parallel and name is None else ""
    return "\n".join([
        f"start: call{repeat}",
        f"call: {json.dumps(CALL_OPEN + chr(10))} body {json.dumps(chr(10) + CALL_CLOSE + chr(10))}",
        f"body: %json {json.dumps(one)}",
    ])  # fmt: skip


def _call_schema(fn: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}  # fmt: skip


def may_become_call(text: str) -> int:
    """Where in `text` a tool call may start: the index of CALL_OPEN, or of a suffix that is a prefix
    of it (streaming holds that part back), else len(text)."""
    at = text.find(CALL_OPEN)
    if at >= 0:
        return at
    for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-k:]):
            return len(text) - k
    return len(text)
