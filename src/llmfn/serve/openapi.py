"""GET /openapi.json, generated from the msgspec schemas, and GET /docs: a self-contained page that
renders it with a few lines of inline JavaScript (no CDN, works offline)."""

from __future__ import annotations

import msgspec

from llmfn.serve import schemas as s

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


def openapi(title: str = "llmfn", version: str = "0") -> dict:
    types = [r[3] for r in ROUTES if r[3] is not None] + list(s.RESPONSES)
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")

    def ref(t) -> dict:
        return {"$ref": f"#/components/schemas/{t.__name__}"}

    error = {"description": "Error", "content": {"application/json": {"schema": ref(s.ErrorResponse)}}}
    paths: dict[str, dict] = {}
    for method, path, summary, request, response, streams, public in ROUTES:
        content = {"application/json": {"schema": ref(response)}}
        if streams:
            content["text/event-stream"] = {
                "schema": {"type": "string", "description": "data: <chunk JSON> lines, then data: [DONE]"}
            }
        op: dict = {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": content}, "default": error},
        }
        if request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
        if "{model}" in path:
            op["parameters"] = [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        if not public:
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
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": "OpenAI-compatible API served by llmfn"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


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
