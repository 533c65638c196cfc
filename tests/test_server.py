"""The HTTP server, end to end: the real Granian server in a subprocess on a free port, driven with
the official `openai` client and raw httpx. A tiny random model takes the wide battery; the default
config (SmolLM2-135M-Instruct + all-MiniLM-L6-v2) takes a few real-model checks."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from server_util import app_of, start_server, write_config
from tiny import make_checkpoint

pytestmark = pytest.mark.slow

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Hello there"}]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint(folder, "llama", seed=3)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    """The tiny model behind bearer auth, CORS for one origin and small limits."""
    folder = tmp_path_factory.mktemp("tiny-server")
    config = write_config(
        folder,
        [{"name": "tiny", "path": str(tiny_dir), "aliases": ["tiny-alias"], "dtype": "float32"}],
        api_keys=[KEY],
        cors_origins=["http://allowed.example"],
        limits={"max_running": 2, "max_queued": 2, "max_tokens": 200, "max_body_bytes": 65536},
    )
    with start_server(config, ready_timeout=120, log_dir=folder) as server:
        yield server


@pytest.fixture(scope="module")
def client(tiny) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny.url("/v1"), api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    import llmfn

    return llmfn.load(tiny_dir)


def post(server, path: str, body=None, *, content: bytes | None = None, headers=AUTH, timeout=60) -> httpx.Response:
    if body is not None:
        content = json.dumps(body).encode()
    headers = {"content-type": "application/json", **headers}
    return httpx.post(server.url(path), content=content, headers=headers, timeout=timeout)


def chat_body(**kw) -> dict:
    return {"model": "tiny", "messages": HI, "max_tokens": 8, "temperature": 0, **kw}


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    frames = response.text.split("\n\n")
    assert frames[-1] == "", "the stream must end with a blank line"
    out = []
    for frame in frames[:-1]:
        assert frame.startswith("data: "), frame
        data = frame[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, *, contains: str = ""
) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    assert contains in error["message"], error
    return error


# ---------------------------------------------------------------------------------------------- chat with the openai client


def test_models_list(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"


def test_chat_usage_and_length(client, tiny_model):
    from llmfn.chat_template import apply_chat_template

    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=7, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "tiny"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    prompt = apply_chat_template(tiny_model.tokenizer, tiny_model.chat_template, HI)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == 7
    assert reply.usage.total_tokens == len(prompt) + 7


def test_stream_equals_non_stream(client):
    kw = dict(model="tiny-alias", messages=HI, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "tiny-alias"


def test_stream_wire_format(tiny):
    """OpenAI's exact framing: role chunk, content deltas, finish chunk, usage chunk, [DONE]."""
    body = chat_body(max_tokens=5, stream=True, stream_options={"include_usage": True})
    events = sse_events(post(tiny, "/v1/chat/completions", body))
    assert events[-1] == "[DONE]"
    first, *middle, final, usage = events[:-1]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(e["choices"][0]["delta"]) == {"content"} for e in middle)
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert all(e["usage"] is None for e in [first, *middle, final])
    # without include_usage there is no usage chunk and no usage key
    events = sse_events(post(tiny, "/v1/chat/completions", chat_body(max_tokens=3, stream=True)))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events[:-1])


def test_content_parts_are_joined(client):
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a\nb"}], max_tokens=4, temperature=0
    )
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    joined = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=4, temperature=0
    )
    assert (
        joined.usage == plain.usage and joined.choices[0].message.content == plain.choices[0].message.content
    )


def test_seed_determinism(client):
    kw = dict(model="tiny", messages=HI, max_tokens=16, temperature=1.0)
    a = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should give different samples"
    stream = client.chat.completions.create(**kw, seed=1234, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == a


def test_stop_strings(client):
    kw = dict(model="tiny", messages=HI, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    start = next(i for i in range(2, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[start : start + 3]
    cut = full[: full.index(stop)]
    reply = client.chat.completions.create(**kw, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kw, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions(client, tiny_model):
    ids = tiny_model.tokenizer.encode("The quick brown fox")
    by_text = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0
    )
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_text.object == "text_completion" and by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 6
    assert by_text.choices[0].finish_reason == "length"
    echo = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0, echo=True
    )
    assert echo.choices[0].text == "The quick brown fox" + by_text.choices[0].text
    two = client.completions.create(
        model="tiny", prompt=["The quick brown fox", "Hello world"], max_tokens=6, temperature=0
    )
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == by_text.choices[0].text
    stream = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == by_text.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs(client):
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: the top token was taken
    assert bytes(b for i in content for b in i.bytes).decode("utf-8", "replace") == reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, temperature=0, logprobs=True, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content])
    legacy = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == legacy.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_default_max_tokens_fills_the_context(client):
    """Without max_tokens a completion may run to the end of the context (256 here), as vLLM does."""
    prompt = list(range(10, 250))  # 240 token ids
    reply = client.completions.create(model="tiny", prompt=prompt, temperature=0)
    assert reply.usage.prompt_tokens == 240 and reply.usage.completion_tokens <= 16
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 16


def test_tokenize_detokenize(tiny, tiny_model):
    from llmfn.chat_template import apply_chat_template

    r = post(tiny, "/tokenize", {"model": "tiny", "prompt": "Hello world"})
    assert r.status_code == 200, r.text
    assert (
        r.json()["tokens"] == tiny_model.tokenizer.encode("Hello world") and r.json()["max_model_len"] == 256
    )
    r = post(tiny, "/tokenize", {"model": "tiny", "messages": HI})
    assert r.json()["tokens"] == apply_chat_template(tiny_model.tokenizer, tiny_model.chat_template, HI)
    r = post(tiny, "/detokenize", {"model": "tiny", "tokens": tiny_model.tokenizer.encode("Hello world")})
    assert r.json() == {"prompt": "Hello world"}


# ---------------------------------------------------------------------------------------------- auth, CORS, public routes


def test_auth(tiny, client):
    r = httpx.get(tiny.url("/v1/models"))
    assert_error(r, 401)
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert_error(httpx.get(tiny.url("/v1/models"), headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(tiny.url("/v1/models"), headers={"Authorization": KEY}), 401)
    assert_error(post(tiny, "/v1/chat/completions", chat_body(), headers={}), 401)
    assert_error(post(tiny, "/tokenize", {"prompt": "x"}, headers={}), 401)
    bad = openai.OpenAI(base_url=tiny.url("/v1"), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    for public in ("/health", "/metrics", "/openapi.json", "/docs", "/"):
        assert httpx.get(tiny.url(public)).status_code == 200, public


def test_cors(tiny):
    pre = httpx.options(tiny.url("/v1/chat/completions"), headers={
        "Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "http://allowed.example"
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = httpx.get(tiny.url("/v1/models"), headers={**AUTH, "Origin": "http://allowed.example"})
    assert r.headers["access-control-allow-origin"] == "http://allowed.example"
    r = httpx.get(tiny.url("/v1/models"), headers={**AUTH, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_openapi_and_docs(tiny):
    spec = httpx.get(tiny.url("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health"} <= set(
        spec["paths"]
    )
    schemas = spec["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    ref = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["$ref"]
    assert ref.rsplit("/", 1)[1] in schemas
    html = httpx.get(tiny.url("/docs"))
    assert html.headers["content-type"].startswith("text/html")
    assert "openapi.json" in html.text and "<script src" not in html.text and "cdn" not in html.text.lower()


def test_web_page_and_static(tiny):
    page = httpx.get(tiny.url("/"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(tiny.url("/static/../app.py")).status_code == 404
    assert httpx.get(tiny.url("/static/nope.js")).status_code == 404


def test_metrics(tiny, client):
    client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0)
    text = httpx.get(tiny.url("/metrics")).text
    for name in ("llmfn_requests_total", "llmfn_prompt_tokens_total", "llmfn_generation_tokens_total",
                 "llmfn_request_duration_seconds_bucket", "llmfn_time_to_first_token_seconds_count",
                 "llmfn_requests_queued", "llmfn_requests_running"):  # fmt: skip
        assert name in text, name
    assert 'llmfn_requests_total{route="/v1/chat/completions",status="200"}' in text


# ---------------------------------------------------------------------------------------------- bad input


BAD = [
    # (path, body or raw bytes, status, param, text in the message)
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, "JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "object"),
    ("/v1/chat/completions", b"", 400, None, "empty"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "messages"),
    ("/v1/chat/completions", chat_body(max_tokens="ten"), 400, "max_tokens", ""),
    ("/v1/chat/completions", chat_body(max_tokens=-5), 400, "max_tokens", ""),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens", ""),
    ("/v1/chat/completions", chat_body(temperature=5), 400, "temperature", ""),
    ("/v1/chat/completions", chat_body(temperature="hot"), 400, "temperature", ""),
    ("/v1/chat/completions", chat_body(top_p=0), 400, "top_p", ""),
    ("/v1/chat/completions", chat_body(presence_penalty=3), 400, "presence_penalty", ""),
    ("/v1/chat/completions", chat_body(seed=2**70), 400, "seed", ""),
    ("/v1/chat/completions", chat_body(n=0), 400, "n", "n"),
    ("/v1/chat/completions", chat_body(n=17), 400, "n", "n"),
    ("/v1/chat/completions", chat_body(stop=5), 400, "stop", ""),
    ("/v1/chat/completions", chat_body(stream="yes"), 400, "stream", ""),
    ("/v1/chat/completions", chat_body(stream_options={"include_usage": True}), 400, "stream_options", ""),
    ("/v1/chat/completions", chat_body(messages=[]), 400, "messages", ""),
    ("/v1/chat/completions", chat_body(messages="hi"), 400, "messages", ""),
    (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "messages[0].role",
        "",
    ),
    (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        "",
    ),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user"}]), 400, "messages[0].content", ""),
    ("/v1/chat/completions", chat_body(messages=[{"content": "hi"}]), 400, "messages[0].role", ""),
    (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content[0].type",
        "text",
    ),  # fmt: skip
    ("/v1/chat/completions", chat_body(model="gpt-nope"), 404, "model", "gpt-nope"),
    ("/v1/chat/completions", chat_body(max_tokens=1000), 400, "max_tokens", "256"),
    ("/v1/chat/completions", chat_body(max_tokens=201), 400, "max_tokens", "200"),
    (
        "/v1/chat/completions",
        chat_body(tools=[{"type": "function", "function": {"description": "no name"}}]),
        400,
        "tools[0].function.name",
        "",
    ),
    ("/v1/chat/completions", chat_body(tool_choice="required"), 400, "tool_choice", "tools"),
    ("/v1/chat/completions", chat_body(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}}}),
     400, "response_format", ""),
    ("/v1/chat/completions", chat_body(guided_regex="(unclosed"), 400, "guided_regex", ""),
    ("/v1/chat/completions", chat_body(guided_choice=["a"], guided_regex="a"), 400, "guided_choice", "one"),
    ("/v1/chat/completions", chat_body(logit_bias={"5": 300}), 400, "logit_bias", ""),
    ("/v1/chat/completions", chat_body(logit_bias={"99999": 1}), 400, "logit_bias", ""),
    ("/v1/responses", {"model": "tiny", "input": "hi", "previous_response_id": "resp_1"}, 400, "previous_response_id", "state"),
    ("/v1/responses", {"model": "tiny", "input": [{"type": "image", "url": "x"}]}, 400, "input[0].type", ""),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt", "384"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", [1, 2]]}, 400, "prompt", ""),
    ("/v1/completions", {"model": "tiny", "prompt": "x " * 300}, 400, "prompt", "256"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "best_of": 3}, 400, "best_of", ""),
    ("/v1/embeddings", {"model": "tiny", "input": "hi"}, 400, "model", "embedding"),
    ("/v1/embeddings", {"input": "hi"}, 400, "model", "embedding"),
    ("/v1/embeddings", {"model": "tiny", "input": 3}, 400, "input", ""),
    (
        "/v1/embeddings",
        {"model": "tiny", "input": "hi", "encoding_format": "hex"},
        400,
        "encoding_format",
        "",
    ),
    ("/tokenize", {"model": "tiny"}, 400, "prompt", ""),
    ("/detokenize", {"model": "tiny", "tokens": [1, 10**6]}, 400, "tokens", ""),
    ("/detokenize", {"model": "tiny", "tokens": [-1]}, 400, "tokens[0]", ""),
]


@pytest.mark.parametrize("path,body,status,param,text", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input(tiny, path, body, status, param, text):
    r = post(tiny, path, content=body) if isinstance(body, bytes) else post(tiny, path, body)
    assert_error(r, status, param, contains=text)


def test_context_error_states_both_numbers(tiny, tiny_model):
    from llmfn.chat_template import apply_chat_template

    n = len(apply_chat_template(tiny_model.tokenizer, tiny_model.chat_template, HI))
    message = assert_error(post(tiny, "/v1/chat/completions", chat_body(max_tokens=250)), 400, "max_tokens")[
        "message"
    ]
    assert "256" in message and str(n) in message and "250" in message


def test_routes_methods_and_sizes(tiny):
    assert_error(httpx.get(tiny.url("/v1/nothing"), headers=AUTH), 404)
    assert_error(httpx.get(tiny.url("/nothing")), 404)
    r = httpx.get(tiny.url("/v1/chat/completions"), headers=AUTH)
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    assert_error(httpx.post(tiny.url("/health")), 405)
    head = httpx.head(tiny.url("/health"))
    assert head.status_code == 200 and head.content == b""
    assert_error(httpx.get(tiny.url("/v1/models/gpt-nope"), headers=AUTH), 404, "model")
    big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}'
    assert_error(post(tiny, "/v1/chat/completions", content=big), 413)

    def chunked():  # no Content-Length: the limit applies while reading
        for _ in range(20):
            yield b"x" * 8192

    assert_error(httpx.post(tiny.url("/v1/chat/completions"), content=chunked(), headers=AUTH), 413)


def test_still_healthy_after_bad_input(tiny, client):
    """Runs after the battery: the engine and the server are unharmed."""
    for body in BAD[:6]:
        post(tiny, body[0], content=body[1]) if isinstance(body[1], bytes) else post(tiny, body[0], body[1])
    assert httpx.get(tiny.url("/health")).status_code == 200
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4


# ---------------------------------------------------------------------------------------------- concurrency, disconnects, queue


def metric(tiny, name: str) -> float:
    """Sum of a metric's samples whose name and labels start with `name` (e.g. 'x{model="tiny"')."""
    lines = httpx.get(tiny.url("/metrics")).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def busy(tiny) -> float:
    return metric(tiny, 'llmfn_requests_running{model="tiny"}') + metric(tiny, 'llmfn_requests_queued{model="tiny"}')


def wait_idle(tiny, what: str) -> None:
    deadline = time.monotonic() + 20
    while busy(tiny) > 0:
        assert time.monotonic() < deadline, f"{what}: the engine still runs it"
        time.sleep(0.1)


def test_concurrent_requests_match_sequential(client):
    prompts = [[{"role": "user", "content": f"Question number {i}"}] for i in range(4)]
    kw = dict(model="tiny", max_tokens=10, temperature=0)
    alone = [client.chat.completions.create(messages=m, **kw).choices[0].message.content for m in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(
                lambda m: client.chat.completions.create(messages=m, **kw).choices[0].message.content, prompts
            )
        )
    assert together == alone


def test_disconnect_cancels_the_request(tiny, client):
    """A client that goes away mid-generation cancels it: the server closes the engine iterator
    (counted as reason="cancelled") and the engine frees the slot."""
    cancelled = 'llmfn_generations_total{model="tiny",reason="cancelled"}'
    before = metric(tiny, cancelled)
    body = chat_body(max_tokens=190, stream=True, temperature=1.0, seed=1)
    with httpx.stream("POST", tiny.url("/v1/chat/completions"), json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: the generation has started
    wait_idle(tiny, "streaming request after disconnect")
    assert metric(tiny, cancelled) == before + 1
    # non-streaming: a client that gives up waiting cancels too (499: "client closed request")
    gone = 'llmfn_requests_total{route="/v1/chat/completions",status="499"}'
    gone_before = metric(tiny, gone)
    # eos (<|im_end|>, id 2) banned: the reply runs all 190 tokens, far longer than the client waits
    long_reply = chat_body(max_tokens=190, temperature=1.0, seed=1, logit_bias={"2": -100})
    with pytest.raises(httpx.ReadTimeout):
        post(tiny, "/v1/chat/completions", long_reply, timeout=httpx.Timeout(10.0, read=0.03))
    wait_idle(tiny, "non-streaming request after disconnect")
    deadline = time.monotonic() + 10
    while metric(tiny, gone) < gone_before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(tiny, gone) == gone_before + 1
    assert client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_full_queue_is_429(tiny):
    """max_running 2 + max_queued 2: of many concurrent long requests some are refused with 429 and
    a Retry-After header."""

    async def one(http: httpx.AsyncClient) -> int:
        r = await http.post("/v1/chat/completions", json=chat_body(max_tokens=150, temperature=1.0, seed=3))
        if r.status_code != 200:
            assert_error(r, 429)
            assert int(r.headers["retry-after"]) >= 1
        return r.status_code

    async def many() -> list[int]:
        async with httpx.AsyncClient(base_url=tiny.url(), headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*(one(http) for _ in range(10)))

    codes = asyncio.run(many())
    assert 429 in codes and 200 in codes
    assert httpx.get(tiny.url("/health")).status_code == 200


# ---------------------------------------------------------------------------------------------- config and start-up


def test_invalid_config_exits_with_one_line(tmp_path):
    cases = {
        "unknown.toml": ("colour = 'blue'\n", "colour"),
        "type.toml": ("[limits]\nmax_tokens = 'lots'\n", "limits.max_tokens"),
        "range.toml": ("[limits]\nmax_running = 0\n", "limits.max_running"),
        "syntax.toml": ("[[models]\nname = \n", "TOML"),
        "dup.toml": ('[[models]]\nname = "a"\npath = "x"\n[[models]]\nname = "a"\npath = "y"\n', "twice"),
        "missing.toml": ('[[models]]\nname = "a"\npath = "/no/such/model"\n', "/no/such/model"),
    }
    for name, (text, _) in cases.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "fields.toml").write_text('[[models]]\npath = "x"\n')
    cases["fields.toml"] = ("", "name")
    cases["absent.toml"] = ("", "absent.toml")
    from llmfn.errors import LlmfnError
    from llmfn.serve import load_config
    from llmfn.serve.config import check_model_paths

    for name, (_, expect) in cases.items():
        with pytest.raises(LlmfnError) as e:
            check_model_paths(load_config(tmp_path / name))
        assert expect in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    # and through the process: one line on stderr, non-zero exit, no traceback
    done = subprocess.run([sys.executable, "-m", "llmfn.serve", "--config", str(tmp_path / "type.toml")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "limits.max_tokens" in done.stderr, done.stderr


def test_health_is_503_while_loading(tiny_dir):
    """In-process: before the loader finishes, /health and the API answer 503; after, 200."""
    from llmfn.serve.app import create_app
    from llmfn.serve.config import AccessLogConfig, ModelConfig, ServerConfig

    config = ServerConfig(models=[ModelConfig(name="tiny", path=str(tiny_dir))], access_log=AccessLogConfig(False))
    app = create_app(config)  # no access log: the App itself, whose pool the test drives

    async def get(path: str) -> tuple[int, dict]:
        sent = []

        async def receive():
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "headers": []}
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])

    async def scenario():
        app.pool.start = lambda: None  # hold the loader back
        status, body = await get("/health")
        assert (status, body["status"]) == (503, "loading")
        status, body = await get("/v1/models")
        assert status == 503 and body["error"]["code"] == "loading"
        del app.pool.start
        app.pool.start()
        await asyncio.to_thread(app.pool.wait, 60)
        status, body = await get("/health")
        assert (status, body) == (200, {"status": "ok", "models": ["tiny"]})
        await asyncio.to_thread(app.pool.shutdown)

    asyncio.run(scenario())


def test_port_in_use_is_one_line(tiny, tiny_dir):
    done = subprocess.run([sys.executable, "-m", "llmfn.serve", "--model", str(tiny_dir), "--port", str(tiny.port)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "already in use" in done.stderr and done.stderr.strip().count("\n") == 0
    assert httpx.get(tiny.url("/health")).status_code == 200


def test_model_that_fails_to_load_stops_the_server(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    server = start_server(None, args=["--model", str(broken)], wait=False, log_dir=tmp_path)
    try:
        assert server.proc.wait(120) != 0
    finally:
        server.stop()
    assert "model 'broken' failed to load" in server.log() and "hidden_size" in server.log()


async def asgi_call(app, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """One request straight into the ASGI app (no server): (status, body)."""
    sent, delivered = [], False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode() if body else b"", "more_body": False}
        await asyncio.Event().wait()  # the client never leaves

    async def send(message):
        sent.append(message)

    raw_headers = [(b"content-type", b"application/json")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await app({"type": "http", "method": method, "path": path, "headers": raw_headers}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_api_keys_from_the_environment(tiny_dir, monkeypatch):
    from llmfn.serve.app import create_app
    from llmfn.serve.config import ModelConfig, ServerConfig

    monkeypatch.setenv("LLMFN_API_KEYS", "env-key-1, env-key-2")
    app = create_app(ServerConfig(models=[ModelConfig(name="tiny", path=str(tiny_dir))], api_keys=["file-key"]))

    async def scenario():
        assert (await asgi_call(app, "GET", "/v1/models"))[0] == 401
        assert (await asgi_call(app, "GET", "/v1/models", headers={"Authorization": "Bearer nope"}))[0] == 401
        for key in ("file-key", "env-key-1", "env-key-2"):
            status, _ = await asgi_call(app, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert status in (200, 503), key  # past auth: listed, or still loading
        assert (await asgi_call(app, "GET", "/health"))[0] in (200, 503)

    try:
        asyncio.run(scenario())
    finally:
        app_of(app).pool.wait(60)
        app_of(app).pool.shutdown()


def test_engine_error_mid_stream(tiny_dir, monkeypatch):
    """In-process, with a forward that fails on the third decode step: a stream that has started ends
    with a data: {"error": ...} event and [DONE]; a non-streaming request gets a 500 in OpenAI's
    shape; the engine keeps serving afterwards."""
    from llmfn.models import llama
    from llmfn.serve.app import create_app
    from llmfn.serve.config import AccessLogConfig, ModelConfig, ServerConfig

    config = ServerConfig(models=[ModelConfig(name="tiny", path=str(tiny_dir))], access_log=AccessLogConfig(False))
    app = create_app(config)  # no access log: the App itself, whose pool the test drives
    app.pool.start()
    assert app.pool.wait(120), app.pool.error
    forward, decodes = llama.forward, [0]

    def failing(params, cfg, tokens, *args, **kw):
        if tokens.shape[1] == 1:
            decodes[0] += 1
            if decodes[0] >= 3:
                raise RuntimeError("boom")
        return forward(params, cfg, tokens, *args, **kw)

    async def scenario():
        monkeypatch.setattr(llama, "forward", failing)
        status, raw = await asgi_call(app, "POST", "/v1/chat/completions", chat_body(max_tokens=20, stream=True))
        assert status == 200
        frames = [f.removeprefix("data: ") for f in raw.decode().split("\n\n") if f]
        assert frames[-1] == "[DONE]"
        error = json.loads(frames[-2])["error"]
        assert "boom" in error["message"] and error["type"] == "server_error"
        assert json.loads(frames[0])["choices"][0]["delta"]["role"] == "assistant"
        decodes[0] = 0
        status, raw = await asgi_call(app, "POST", "/v1/chat/completions", chat_body(max_tokens=20))
        assert status == 500 and "boom" in json.loads(raw)["error"]["message"]
        monkeypatch.setattr(llama, "forward", forward)
        status, raw = await asgi_call(app, "POST", "/v1/chat/completions", chat_body(max_tokens=4))
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 4

    try:
        asyncio.run(scenario())
    finally:
        app.pool.shutdown()


# ---------------------------------------------------------------------------------------------- the default models


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """`llmfn serve` with no config: SmolLM2-135M-Instruct and all-MiniLM-L6-v2, no API keys."""
    from llmfn.errors import CheckpointError
    from llmfn.loading.registry import ALIASES, package_path

    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2"):
        try:
            package_path(ALIASES[name])
        except CheckpointError as e:
            pytest.fail(str(e))
    with start_server(None, ready_timeout=600, log_dir=tmp_path_factory.mktemp("default-server")) as server:
        yield server


def test_default_server_chat(default_server):
    assert "API is open" in default_server.log()
    client = openai.OpenAI(base_url=default_server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    assert {m.id for m in client.models.list().data} == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    kw = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
              max_tokens=24, temperature=0)  # fmt: skip
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-1].usage == whole.usage
    assert "Paris" in whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 24
    short = client.chat.completions.create(**{**kw, "max_tokens": 3})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2-135m-instruct", input="hi")


def test_default_server_embeddings(default_server):
    client = openai.OpenAI(base_url=default_server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    res = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    vecs = [d.embedding for d in res.data]
    assert [d.index for d in res.data] == [0, 1, 2] and all(len(v) == 384 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vecs)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2
    assert res.usage.prompt_tokens == res.usage.total_tokens > 3 * 2
    raw = httpx.post(default_server.url("/v1/embeddings"), timeout=60,
                     json={"model": "all-minilm-l6-v2", "input": texts[0], "encoding_format": "base64"}).json()  # fmt: skip
    decoded = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, vecs[0], strict=True)) < 1e-6
    # the openai client asks for base64 by default and decodes it itself
    assert len(client.embeddings.create(model="all-minilm-l6-v2", input="one").data[0].embedding) == 384
    r = httpx.post(default_server.url("/v1/chat/completions"), timeout=60,
                   json={"model": "all-minilm-l6-v2", "messages": HI})  # fmt: skip
    assert_error(r, 400, "model")


def test_default_server_reuses_a_shared_prefix(default_server):
    """A long shared system prompt: the second request takes its whole prefill chunks from the prefix
    cache (reported as cached_tokens) and answers exactly as the first request's cold prefill would."""
    client = openai.OpenAI(base_url=default_server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    system = " ".join(f"Rule {i}: answer questions about topic {i} in a single short sentence." for i in range(40))

    def ask(question: str):
        return client.chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=6, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        )  # fmt: skip

    first, second, again = ask("What is rule 3?"), ask("What is rule 9?"), ask("What is rule 3?")
    assert first.usage.prompt_tokens > 512 and first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 256 == 0 and cached <= second.usage.prompt_tokens - 1
    assert again.usage.prompt_tokens_details.cached_tokens >= cached
    assert again.choices[0].message.content == first.choices[0].message.content


def test_speculative_server_answers_exactly_as_the_plain_one(tiny, tiny_dir, tmp_path):
    """speculative = "ngram" on a model: the same completions, token for token, and drafts counted."""
    config = write_config(tmp_path, [{"name": "tiny", "path": str(tiny_dir), "speculative": "ngram"}])
    ids = list(range(3, 200)) + list(range(3, 10))  # most tokens the model can draw occur in the prompt
    body = {"model": "tiny", "prompt": ids, "max_tokens": 40, "temperature": 0.8, "seed": 3, "logprobs": 1}
    with start_server(config, ready_timeout=120, log_dir=tmp_path) as spec:
        got = httpx.post(spec.url("/v1/completions"), json=body, timeout=60).json()
        metrics = httpx.get(spec.url("/metrics")).text
    want = post(tiny, "/v1/completions", body).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"] and got["usage"] == want["usage"]
    assert got["choices"][0]["logprobs"] == want["choices"][0]["logprobs"]
    drafted = [line for line in metrics.splitlines() if line.startswith("llmfn_speculative_drafted_tokens{")]
    assert drafted and float(drafted[0].split()[-1]) > 0
