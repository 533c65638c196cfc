"""GET /openapi.json, generated from the msgspec schemas, and GET /docs: a self-contained page that
renders it with a few lines of inline JavaScript (no CDN, works offline)."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from llmfn.serve import schemas as s
from llmfn.serve.completions import MAX_PROMPTS
from llmfn.serve.embeddings import MAX_EMBEDDING_INPUTS

# (method, path, summary, request struct or None, response struct, streams SSE, public)
ROUTES = [
    ("post", "/v1/chat/completions", "Chat completion (set stream for server-sent events)", s.ChatCompletionRequest, s.ChatCompletion, True, False),
    ("post", "/v1/completions", "Text completion from a prompt string or token ids", s.CompletionRequest, s.Completion, True, False),
    ("post", "/v1/responses", "Responses API, one model turn (stream: response.* events); no server-side state", s.ResponsesRequest, s.ResponseObject, True, False),
    ("post", "/v1/embeddings", "Sentence embeddings (float or base64)", s.EmbeddingRequest, s.EmbeddingList, False, False),
    ("get", "/v1/models", "The served models and their aliases", None, s.ModelList, False, False),
    ("get", "/v1/models/{model}", "One served model", None, s.ModelCard, False, False),
    ("post", "/tokenize", "Token ids of a prompt or of chat messages (vLLM's shape)", s.TokenizeRequest, s.TokenizeResponse, False, False),
    ("post", "/detokenize", "Text of token ids (vLLM's shape)", s.DetokenizeRequest, s.DetokenizeResponse, False, False),
    ("get", "/health", "200 once every model is loaded, 503 while loading", None, s.Health, False, True),
]  # fmt: skip

# The errors each kind of route answers (besides 401 without a valid key when the server has keys).
ERRORS = {
    "400": "Invalid request: a wrong type or value, or a prompt over the model's context (param names the field)",
    "404": "No such model", "408": "The request body did not arrive within the server's request_timeout",
    "413": "The request body is larger than the server's max_body_bytes",
    "429": "The queue is full (max_queued): retry after the Retry-After header's seconds",
    "500": "The generation failed", "503": "The models are still loading, or the server is shutting down",
}  # fmt: skip
GENERATES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def _event(description: str, data: dict, error: dict) -> dict:
    """One server-sent event of a stream (OpenAPI 3.1 has `schema` describe each event): its data is
    a chunk, an error (a generation that failed midway, a shutdown) or [DONE], the last."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [data, error]}}
    return {"type": "object", "required": ["data"], "description": f"Server-sent events: {description}; `: keep-alive` "
            "comments while waiting (e.g. queued for a slot), then data: [DONE]",
            "properties": {"event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}  # fmt: skip
SSE = {
    "/v1/chat/completions": "data: <ChatCompletionChunk JSON> per event",
    "/v1/completions": "data: <Completion JSON> per event (one choice each)",
    "/v1/responses": "event: response.<kind> + data: <its JSON> per event",
}


@dataclass(frozen=True)
class ModelFacts:
    """What the loaded models take, for the document: the names (aliases included) of the "chat"
    (causal, with a chat template), "causal-lm", "embedding" and "any" models; the vocabulary size of
    the "causal-lm" and "embedding" models (the smallest: token ids below it are taken by all); the
    embedding models' shortest limit and their vector size (when they share one)."""

    names: dict[str, list[str]]
    vocab: dict[str, int]
    vocab_by_name: dict[str, int] | None = None  # what /detokenize checks a model's ids against
    embedding_context: int | None = None
    embedding_dim: int | None = None


def openapi(title: str = "llmfn", version: str = "0", *, auth: bool = True, max_tokens: int | None = None,
            served: ModelFacts | None = None) -> dict:  # fmt: skip
    """The OpenAPI document of a server: its routes and schemas, the errors each route answers, and
    what its handlers check beyond the types (`narrow`). `auth`: the API asks for a bearer key;
    `max_tokens`: the server's limit; `served`: its models, once loaded."""
    types = [r[3] for r in ROUTES if r[3] is not None] + list(s.RESPONSES)
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    narrow(components, max_tokens, served or ModelFacts({}, {}))

    def ref(t) -> dict:
        return {"$ref": f"#/components/schemas/{t.__name__}"}

    def error(description: str) -> dict:
        return {"description": description, "content": {"application/json": {"schema": ref(s.ErrorResponse)}}}

    paths: dict[str, dict] = {}
    for method, path, summary, request, response, streams, public in ROUTES:
        content = {"application/json": {"schema": ref(response)}}
        if streams:
            content["text/event-stream"] = {"schema": _event(SSE[path], ref(s.STREAMED[path]), ref(s.ErrorResponse))}
        codes = ["503"]
        if request is not None:
            codes += ["400", "404", "408", "413"] + (["429", "500"] if path in GENERATES else [])
        elif "{model}" in path:
            codes += ["404"]
        responses = {"200": {"description": "OK", "content": content}} | {c: error(ERRORS[c]) for c in sorted(codes)}
        if path == "/health":
            responses["503"] = {"description": "Loading, or a model failed to load", "content": {"application/json": {"schema": ref(response)}}}
        if auth and not public:
            responses["401"] = error("Missing or wrong API key")
        op: dict = {"summary": summary, "responses": responses}
        if request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
        if "{model}" in path:
            op["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
        if auth and not public:
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = op
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics (text format)",
            "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
            },
        }
    }
    doc = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": "OpenAI-compatible API served by llmfn"},
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def _ids(vocab: int | None, min_items: int = 1) -> dict:
    return {"type": "array", "minItems": min_items,
            "items": {"type": "integer", "minimum": 0} | ({"maximum": vocab - 1} if vocab else {})}  # fmt: skip


def _prompt(vocab: int | None, most: int) -> dict:
    """A prompt or an embedding input as the handlers take it: a string, a list of strings, a token id
    list or a list of token id lists (at most `most` in a list), none of them empty."""
    text = {"type": "string", "minLength": 1}
    return {"anyOf": [text, {"type": "array", "minItems": 1, "maxItems": most, "items": text}, _ids(vocab),
                      {"type": "array", "minItems": 1, "maxItems": most, "items": _ids(vocab)}]}  # fmt: skip


# The Responses API input items as llmfn.serve.responses reads them: a message (only an assistant's
# content may be missing), a function call, or a function call's output (any JSON; non-strings are
# sent as JSON text).
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["input_text", "output_text", "text"]}, "text": {"type": "string"}}}}]}  # fmt: skip
_CALL_ID = {"type": ["string", "null"]}
RESPONSES_INPUT = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"enum": ["message"]}, "role": {"enum": ["user", "system", "developer", "tool"]}, "content": _CONTENT}},
    {"type": "object", "required": ["role"], "properties": {
        "type": {"enum": ["message"]}, "role": {"enum": ["assistant"]}, "content": {"anyOf": [_CONTENT, {"type": "null"}]}}},
    {"type": "object", "required": ["type", "name"], "properties": {
        "type": {"enum": ["function_call"]}, "call_id": _CALL_ID, "name": {"type": "string"},
        "arguments": {"type": "string"}}},
    {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["function_call_output"]}, "call_id": _CALL_ID, "output": {}}},
]}}]}  # fmt: skip


def _at_most(m: int) -> str:
    """A regex of the decimal numbers 0..m (without leading zeros)."""
    digits = str(m)
    k = len(digits)
    alternatives = (["[0-9]"] if k > 1 else []) + [f"[1-9][0-9]{{{j - 1}}}" for j in range(2, k)]
    for i, d in enumerate(digits):
        low = 1 if i == 0 and k > 1 else 0
        if int(d) > low:
            rest = k - i - 1
            alternatives.append(digits[:i] + f"[{low}-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "|".join([*alternatives, digits])


def narrow(components: dict, max_tokens: int | None, served: ModelFacts) -> None:
    """What the handlers check beyond the wire types, said in the schemas: a text part has text;
    /tokenize takes exactly one of prompt and messages; prompts and inputs are not empty nor mixed
    lists; max_tokens is within the server's limit; Responses input items have the shapes it reads and
    it keeps no state. Once the models are loaded: the model names each route takes, token ids (and
    logit_bias keys) within the vocabulary, the embedding size and truncate_prompt_tokens' range."""
    props = {name: schema["properties"] for name, schema in components.items() if "properties" in schema}
    part = components["ContentPart"]
    part["required"] = ["type", "text"]
    props["ContentPart"]["text"] = {"type": "string"}
    vocab = served.vocab
    props["CompletionRequest"]["prompt"] = _prompt(vocab.get("causal-lm"), MAX_PROMPTS)
    props["EmbeddingRequest"]["input"] = _prompt(vocab.get("embedding"), MAX_EMBEDDING_INPUTS)
    props["DetokenizeRequest"]["tokens"] = _ids(None, 0)
    if served.vocab_by_name:  # each model's token ids (no model: the first chat model's)
        components["DetokenizeRequest"]["oneOf"] = [
            {"properties": {"model": {"type": "null"}, "tokens": _ids(vocab.get("causal-lm"), 0)}}] + [
            {"required": ["model"], "properties": {"model": {"const": name}, "tokens": _ids(size, 0)}}
            for name, size in served.vocab_by_name.items()]  # fmt: skip
    messages = props["TokenizeRequest"]["messages"]["anyOf"][0]
    with_messages = {"messages": messages, "prompt": {"type": "null"}}
    if "chat" in served.names:
        with_messages["model"] = {"anyOf": [{"enum": served.names["chat"]}, {"type": "null"}]}
    components["TokenizeRequest"]["anyOf"] = [  # exactly one of them given and not null
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": with_messages}]  # fmt: skip
    for request in ("ChatCompletionRequest", "CompletionRequest"):  # stream_options only with stream=true
        components[request]["anyOf"] = [{"properties": {"stream_options": {"type": "null"}}},
                                        {"required": ["stream"], "properties": {"stream": {"const": True}}}]  # fmt: skip
    components["ChatCompletionRequest"]["allOf"] = [{"anyOf": [  # top_logprobs only with logprobs=true
        {"properties": {"top_logprobs": {"type": "null"}}},
        {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}]}]  # fmt: skip
    props["CompletionRequest"]["best_of"] = {"anyOf": [{"const": 1}, {"type": "null"}], "description": "only 1"}
    props["CompletionRequest"]["suffix"] = {"anyOf": [{"const": ""}, {"type": "null"}], "description": "not supported"}
    props["ResponsesRequest"]["input"] = RESPONSES_INPUT
    props["ResponsesRequest"]["previous_response_id"] = {"type": "null", "description": "not supported (no state)"}
    if max_tokens is not None:
        for name, field in (("ChatCompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_completion_tokens"),
                            ("CompletionRequest", "max_tokens"), ("ResponsesRequest", "max_output_tokens")):  # fmt: skip
            props[name][field]["anyOf"][0]["maximum"] = max_tokens
    for request, kind in (("ChatCompletionRequest", "chat"), ("ResponsesRequest", "chat"), ("CompletionRequest", "causal-lm"),
                          ("EmbeddingRequest", "embedding"), ("TokenizeRequest", "any"), ("DetokenizeRequest", "any")):  # fmt: skip
        if kind in served.names:
            props[request]["model"] = {"anyOf": [{"enum": served.names[kind]}, {"type": "null"}], "default": None}
    if "causal-lm" in vocab:
        for request in ("ChatCompletionRequest", "CompletionRequest"):
            bias = props[request]["logit_bias"]["anyOf"][0]
            bias["propertyNames"] = {"pattern": rf"^\s*0*(?:{_at_most(vocab['causal-lm'] - 1)})\s*$"}
    if served.embedding_context is not None:
        props["EmbeddingRequest"]["truncate_prompt_tokens"]["anyOf"][0] = {
            "type": "integer", "anyOf": [{"const": -1}, {"minimum": 1, "maximum": served.embedding_context}]}  # fmt: skip
    if served.embedding_dim is not None:
        props["EmbeddingRequest"]["dimensions"]["anyOf"][0] = {"const": served.embedding_dim}


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmfn API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{margin-bottom:.2rem} code,pre{font-family:ui-monospace,monospace;font-size:13px}
.op{border:1px solid #ddd;border-radius:6px;margin:.6rem 0;padding:.5rem .8rem}
.m{display:inline-block;min-width:3.5rem;font-weight:700;text-transform:uppercase}
.post{color:#1a7f37}.get{color:#0969da} .lock{color:#9a6700;font-size:12px;margin-left:.5rem}
details{margin:.3rem 0} summary{cursor:pointer} table{border-collapse:collapse;margin:.3rem 0}
td,th{border-bottom:1px solid #eee;padding:.15rem .6rem;text-align:left;vertical-align:top}
a{color:#0969da}
</style></head>
<body><h1>llmfn API</h1><p id="desc">Loading <a href="openapi.json">openapi.json</a>&hellip;</p>
<h2>Endpoints</h2><div id="paths"></div><h2>Schemas</h2><div id="schemas"></div>
<script>
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const name = r => r.split("/").pop();
function type(t) {
  if (!t) return "any";
  if (t.$ref) return `<a href="#${name(t.$ref)}">${name(t.$ref)}</a>`;
  if (t.anyOf) return t.anyOf.map(type).join(" | ");
  if (t.enum) return t.enum.map(v => esc(JSON.stringify(v))).join(" | ");
  if ("const" in t) return esc(JSON.stringify(t.const));
  if (t.type === "array") return `array[${type(t.items)}]`;
  let out = esc(t.type || "object");
  const lim = [["minimum", "&ge;"], ["exclusiveMinimum", "&gt;"], ["maximum", "&le;"], ["exclusiveMaximum", "&lt;"],
               ["minLength", "min length "]].filter(([k]) => k in t).map(([k, s]) => s + t[k]);
  return lim.length ? `${out} (${lim.join(", ")})` : out;
}
fetch("openapi.json").then(r => r.json()).then(spec => {
  document.getElementById("desc").innerHTML = esc(spec.info.description) +
    ` &middot; <a href="openapi.json">openapi.json</a> &middot; endpoints marked with a lock need <code>Authorization: Bearer &lt;key&gt;</code> when the server has API keys.`;
  let html = "";
  for (const [path, ops] of Object.entries(spec.paths)) for (const [m, op] of Object.entries(ops)) {
    const req = op.requestBody ? type(op.requestBody.content["application/json"].schema) : "";
    const ok = op.responses["200"].content; const res = Object.entries(ok).map(([ct, c]) => `${type(c.schema)} <small>${esc(ct)}</small>`).join(", ");
    html += `<div class="op"><span class="m ${m}">${m}</span> <code>${esc(path)}</code>${op.security ? '<span class="lock">&#128274; key</span>' : ""}
      <div>${esc(op.summary || "")}</div>${req ? `<div>request: ${req}</div>` : ""}<div>response: ${res}</div></div>`;
  }
  document.getElementById("paths").innerHTML = html;
  html = "";
  for (const [n, sch] of Object.entries(spec.components.schemas)) {
    const req = new Set(sch.required || []);
    const rows = Object.entries(sch.properties || {}).map(([p, t]) =>
      `<tr><td><code>${esc(p)}</code>${req.has(p) ? " *" : ""}</td><td>${type(t)}</td><td>${"default" in t ? esc(JSON.stringify(t.default)) : ""}</td><td>${esc(t.description || "")}</td></tr>`).join("");
    html += `<details id="${esc(n)}"><summary><code>${esc(n)}</code> ${esc(sch.description || sch.title || "")}</summary>
      ${rows ? `<table><tr><th>field</th><th>type</th><th>default</th><th></th></tr>${rows}</table>` : type(sch)}</details>`;
  }
  document.getElementById("schemas").innerHTML = html;
  if (location.hash) { const el = document.getElementById(location.hash.slice(1)); if (el) { el.open = true; el.scrollIntoView(); } }
}).catch(e => { document.getElementById("desc").textContent = "Could not load openapi.json: " + e; });
</script></body></html>
"""
