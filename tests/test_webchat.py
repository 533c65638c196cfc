"""The web chat page (GET /) in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Mocked tests serve the page from the package folder and answer /v1/* through `page.route`, so the
rendering and request shapes are checked exactly (hostile markup in the answer, auth); live tests run
`llmfn serve` with a tiny model: a streamed answer appears, and Stop aborts the request and the server
cancels the generation. Screenshots go to test-artifacts/.

Chromium is a test requirement, not optional hardware: without it these tests fail and say how to
install it (set LLMFN_SKIP_BROWSER_TESTS=1 to skip them on purpose)."""

from __future__ import annotations

import fnmatch
import json
import mimetypes
import os
import re
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_util import start_server, write_config
from tiny import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "src" / "llmfn" / "serve" / "static" / "index.html"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("LLMFN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
MOCK = "http://llmfn.test"  # the page's origin in the mocked tests: every request is answered by a route
HOSTILE = ('Look: <script>window.pwned = 1; alert("script")</script> and <img src=x onerror="window.pwned = 2; '
           'alert(1)"> and <b>bold?</b> [click](javascript:alert(3)) **really bold** `<i>code</i>`\n\n'
           '```html\n<script>alert(4)</script>\n```\n- <svg onload=alert(5)>\n')  # fmt: skip

if os.environ.get("LLMFN_SKIP_BROWSER_TESTS"):
    pytest.skip("LLMFN_SKIP_BROWSER_TESTS is set", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the web chat tests need Chromium at {CHROMIUM}: `apt-get install -y chromium` (Debian), or "
                    "set LLMFN_CHROMIUM to its path (LLMFN_SKIP_BROWSER_TESTS=1 skips these tests)", pytrace=False)  # fmt: skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the web chat tests need Playwright's Python package: `pip install playwright` "
                    "(its own browser download is not needed)", pytrace=False)  # fmt: skip
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    page.errors = []
    page.dialogs = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.set_default_timeout(30_000)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"webchat-{request.node.name}.png"), full_page=True)
    context.close()


def sse(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def delta(text: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}]
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny", "choices": choices}
    if usage:
        chunk["usage"] = usage
    return chunk


def mock_server(page, answer: str, *, key: str | None = None, models=("tiny", "other"), origin: str = MOCK) -> list:
    """Serve the page at origin/ and answer /v1/models and /v1/chat/completions; returns the chat requests."""
    requests = []

    def authorized(route) -> bool:
        if key is None or route.request.headers.get("authorization") == f"Bearer {key}":
            return True
        route.fulfill(status=401, content_type="application/json",
                      body=json.dumps({"error": {"message": "invalid or missing API key", "type": "auth"}}))  # fmt: skip
        return False

    def index(route):
        route.fulfill(status=200, content_type="text/html; charset=utf-8", body=PAGE.read_text())

    def static(route):  # the vendored highlight.js, from the package folder
        file = PAGE.parent / route.request.url.removeprefix(f"{origin}/static/")
        route.fulfill(status=200, body=file.read_bytes(), content_type=mimetypes.guess_type(file.name)[0])

    def list_models(route):
        if authorized(route):
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "llmfn", "type": "causal-lm"} for m in models]
            data.append({"id": "minilm", "object": "model", "created": 0, "owned_by": "llmfn", "type": "embedding"})
            route.fulfill(status=200, content_type="application/json", body=json.dumps({"object": "list", "data": data}))

    def chat(route):
        requests.append({"body": json.loads(route.request.post_data), "headers": route.request.headers})
        if authorized(route):
            pieces = [answer[i : i + 7] for i in range(0, len(answer), 7)]  # splits tags across chunks
            body = sse(delta(""), *(delta(p) for p in pieces), delta(finish="stop"),
                       delta(usage={"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}))  # fmt: skip
            route.fulfill(status=200, content_type="text/event-stream", body=body)

    page.route(f"{origin}/", index)
    page.route(f"{origin}/static/**", static)
    page.route(f"{origin}/v1/models", list_models)
    page.route(f"{origin}/v1/chat/completions", chat)
    return requests


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_answer(page):
    return page.locator(".msg.assistant").last


# ------------------------------------------------------------------------------------------ mocked


def test_model_output_is_shown_as_text_never_run(page):
    requests = mock_server(page, HOSTILE)
    page.goto(f"{MOCK}/")
    send(page, 'user text <img src=x onerror="window.pwned = 3">')
    answer = last_answer(page)
    answer.and_(page.locator("[data-state=done]")).wait_for()
    text = answer.locator(".content").inner_text()
    for shown in ('<script>window.pwned = 1; alert("script")</script>', '<img src=x onerror="window.pwned = 2; alert(1)">',
                  "<b>bold?</b>", "[click](javascript:alert(3))", "<i>code</i>", "<script>alert(4)</script>",
                  "<svg onload=alert(5)>"):  # fmt: skip
        assert shown in text
    messages = page.locator("#messages")
    assert messages.locator("script, img, svg, iframe, b, i, [onerror], [onload]").count() == 0
    assert page.locator(".msg.user").inner_text() == 'user text <img src=x onerror="window.pwned = 3">'
    # the markdown that is allowed still renders: bold, inline code, a code block, a list
    assert answer.locator("strong").inner_text() == "really bold"
    assert answer.locator("p code").inner_text() == "<i>code</i>"
    assert answer.locator("pre code").inner_text() == "<script>alert(4)</script>"
    assert answer.locator("li").inner_text() == "<svg onload=alert(5)>"
    assert answer.locator("a").count() == 0  # a javascript: link is never made clickable
    page.wait_for_timeout(300)  # give any injected handler the chance to fire
    assert page.evaluate("window.pwned") is None
    assert page.dialogs == [] and page.errors == []
    assert re.search(r"\d+ tokens, [\d.]+ tok/s", answer.locator(".meta").inner_text())
    body = requests[0]["body"]
    assert body["stream"] is True and body["model"] == "tiny"
    assert body["messages"] == [{"role": "user", "content": 'user text <img src=x onerror="window.pwned = 3">'}]


def test_markdown_rendering(page):
    mock_server(page, "")
    page.goto(f"{MOCK}/")
    html = page.evaluate("""(text) => { const d = document.createElement('div'); window.llmfnChat.renderMarkdown(text, d);
                                          return d.innerHTML; }""",  # fmt: skip
                         "# Title\n\nSome *em* and **strong** with `code`.\n\n1. one\n2. two\n\n> quoted\n\n"
                         "See [docs](https://example.com/a?b=1) or https://example.org.\n\n```python\nx = '<b>'\n```")  # fmt: skip
    assert "<h1>Title</h1>" in html
    assert "<em>em</em>" in html and "<strong>strong</strong>" in html and "<code>code</code>" in html
    assert "<ol><li>one</li><li>two</li></ol>" in html
    assert "<blockquote><p>quoted</p></blockquote>" in html
    assert '<a href="https://example.com/a?b=1" target="_blank" rel="noopener noreferrer nofollow">docs</a>' in html
    assert '<a href="https://example.org/"' in html and "</a>." in html
    assert '<code data-lang="python">x = \'&lt;b&gt;\'</code>' in html


def test_request_carries_settings_and_conversation(page):
    requests = mock_server(page, "Paris.")
    page.goto(f"{MOCK}/")
    page.locator("#model option").first.wait_for(state="attached")
    assert page.locator("#model option").all_inner_texts() == ["tiny", "other"]  # embedding models left out
    page.select_option("#model", "other")
    page.click("#settings summary")
    assert not page.locator("#api-key").is_visible()  # no auth on this server: no key field
    page.fill("#system", "Be brief.")
    page.fill("#temperature", "0.25")
    page.fill("#max-tokens", "33")
    send(page, "Capital of France?")
    last_answer(page).and_(page.locator("[data-state=done]")).wait_for()
    send(page, "And of Italy?")
    page.locator(".msg.assistant[data-state=done]").nth(1).wait_for()
    body = requests[1]["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("other", 0.25, 33)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert "authorization" not in requests[1]["headers"]
    page.click("#reset")  # a new chat forgets the conversation
    assert page.locator(".msg").count() == 0
    send(page, "Hello")
    last_answer(page).and_(page.locator("[data-state=done]")).wait_for()
    assert requests[2]["body"]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def test_api_key_field_appears_and_is_sent(page):
    requests = mock_server(page, "Welcome.", key="sk-secret")
    page.goto(f"{MOCK}/")
    page.locator("#api-key").wait_for(state="visible")  # shown once /v1/models answers 401
    assert page.locator("#model option").count() == 0
    assert "API key" in page.locator("#status").inner_text()
    page.fill("#api-key", "sk-secret")
    page.locator("#api-key").dispatch_event("change")
    page.locator("#model option").first.wait_for(state="attached")
    send(page, "Hi")
    last_answer(page).and_(page.locator("[data-state=done]")).wait_for()
    assert requests[-1]["headers"]["authorization"] == "Bearer sk-secret"
    assert last_answer(page).locator(".content").inner_text() == "Welcome."


SECURE_MOCK = "http://llmfn.localhost"  # *.localhost is a secure context: the Clipboard API is there


def copied(page, button) -> str:
    """Click a Copy button, wait for it to say so, and return what the clipboard then holds."""
    button.click()
    page.wait_for_function("(b) => b.textContent === 'Copied'", arg=button.element_handle())
    return page.evaluate("navigator.clipboard.readText()")


def test_code_blocks_are_highlighted_and_copied(page):
    code = 'def greet(name):\n    return f"<b>{name}</b>"  # not markup'
    mock_server(page, f"Here:\n\n```python\n{code}\n```\n\nand plain:\n\n```\nls -la /tmp\n```\n", origin=SECURE_MOCK)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=SECURE_MOCK)
    page.goto(f"{SECURE_MOCK}/")
    send(page, "Show me code")
    answer = last_answer(page)
    answer.and_(page.locator("[data-state=done]")).wait_for()
    python = answer.locator("pre code").first
    assert python.get_attribute("class").split() == ["language-python", "hljs"]  # highlight.js ran
    assert python.locator("span.hljs-keyword").first.inner_text() == "def"
    assert python.locator("span.hljs-string").count() >= 1 and python.locator("b").count() == 0
    assert python.inner_text() == code  # the colours change nothing in the text
    assert answer.locator("pre .lang").first.inner_text() == "python"
    assert copied(page, answer.locator("pre [data-action=copy-code]").first) == code
    assert copied(page, answer.locator("pre [data-action=copy-code]").nth(1)) == "ls -la /tmp"  # no language named
    whole = copied(page, page.locator(".turn.assistant [data-action=copy]"))  # a whole answer, as markdown
    assert whole.startswith("Here:\n\n```python\n") and whole.endswith("```\n")
    assert page.errors == []


# -------------------------------------------------------------------------------------------- live


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """`llmfn serve` with a tiny model that never emits EOS, so an answer runs to max_tokens."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("webchat") / "tiny"
    make_checkpoint(folder, max_position_embeddings=4096)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"][2] = 0.0  # <|im_end|> (EOS) gets logit 0: greedy decoding never picks it
    save_file(tensors, weights, metadata={"format": "pt"})
    config = write_config(folder.parent, [{"name": "tiny", "path": str(folder)}])
    command = [str(Path(sys.executable).parent / "llmfn"), "serve", "--api-key", LIVE_KEY]  # auth on
    with start_server(config, command=command) as server:
        yield server


LIVE_KEY = "sk-live-test"


def open_live(page, server) -> None:
    """Open the page, give it the API key it asks for, wait for the model list."""
    page.goto(server.url("/"))
    page.locator("#api-key").wait_for(state="visible")
    page.fill("#api-key", LIVE_KEY)
    page.locator("#api-key").dispatch_event("change")
    page.locator("#model option").first.wait_for(state="attached")


def test_live_chat_streams_an_answer(page, live_server):
    open_live(page, live_server)
    assert page.locator("#model").input_value() == "tiny"
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    send(page, "Hello, who are you?")
    answer = last_answer(page)
    answer.and_(page.locator("[data-state=done]")).wait_for(timeout=60_000)
    assert answer.locator(".content").inner_text().strip()
    assert re.fullmatch(r"40 tokens, [\d.]+ tok/s · first token [\d.]+ m?s · cut at max tokens",
                        answer.locator(".meta").inner_text())  # fmt: skip
    assert page.errors == []


def cancelled_total(server) -> float:
    metrics = httpx.get(server.url("/metrics"), timeout=10).text
    return sum(float(m) for m in re.findall(r'llmfn_generations_total\{[^}]*reason="cancelled"[^}]*\} ([\d.]+)', metrics))


def test_live_stop_aborts_and_the_server_cancels(page, live_server):
    open_live(page, live_server)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "4000")  # far more than it can write before Stop
    before = cancelled_total(live_server)
    send(page, "Tell me a very long story.")
    answer = last_answer(page)
    page.wait_for_function("() => document.querySelector('.msg.assistant .content').textContent.length > 0")
    page.locator("#stop").click()
    answer.and_(page.locator("[data-state=stopped]")).wait_for(timeout=10_000)
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    assert "stopped" in answer.locator(".meta").inner_text()
    stopped_text = answer.locator(".content").inner_text()
    page.wait_for_timeout(500)
    assert answer.locator(".content").inner_text() == stopped_text  # nothing arrives after Stop
    deadline = time.monotonic() + 20
    while cancelled_total(live_server) <= before:  # the server saw the disconnect and cancelled
        assert time.monotonic() < deadline, "the server did not record a cancelled generation"
        time.sleep(0.2)
    page.fill("#max-tokens", "5")
    send(page, "Short one?")  # the page and the server take the next question
    page.locator(".msg.assistant").nth(1).and_(page.locator("[data-state=done]")).wait_for(timeout=60_000)


# ------------------------------------------------------------ live: conversations, actions, settings


def chat_bodies(page) -> list:
    """The JSON bodies of the page's chat requests, as they leave the browser."""
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def answered(page, index: int = -1):
    """The answer at `index` once it is complete."""
    answer = page.locator(".msg.assistant").nth(index)
    answer.and_(page.locator("[data-state=done]")).wait_for(timeout=60_000)
    return answer


def answer_text(page, index: int = -1) -> str:
    return answered(page, index).locator(".content").inner_text()


def sidebar_titles(page) -> list[str]:
    return page.locator("#conversations .conv .open").all_inner_texts()


def test_live_conversations_survive_a_reload_and_switch_rename_delete(page, live_server):
    open_live(page, live_server)
    bodies = chat_bodies(page)
    page.fill("#max-tokens", "6")
    send(page, "First question")
    first_answer = answer_text(page)
    page.click("#reset")
    send(page, "Second question")
    answered(page)
    assert sidebar_titles(page) == ["Second question", "First question"]  # newest first

    page.reload()
    page.locator(".msg.assistant").first.wait_for()
    assert sidebar_titles(page) == ["Second question", "First question"]
    assert page.locator(".msg.user").all_inner_texts() == ["Second question"]  # the conversation on screen before
    page.locator(".conv", has_text="First question").locator("[data-action=open]").click()
    assert page.locator(".msg.user").all_inner_texts() == ["First question"]
    assert page.locator(".msg.assistant .content").inner_text() == first_answer
    assert re.match(r"6 tokens, [\d.]+ tok/s · first token", page.locator(".msg.assistant .meta").inner_text())
    send(page, "Follow-up")  # continues the conversation it switched to, with its history
    answered(page, 1)
    assert [m["content"] for m in bodies[-1]["messages"]] == ["First question", first_answer, "Follow-up"]
    assert sidebar_titles(page)[0] == "First question"  # the one just used moves up

    row = page.locator(".conv", has_text="First question")
    row.locator("[data-action=rename]").click()
    page.fill(".conv .title-input", "Renamed chat")
    page.press(".conv .title-input", "Enter")
    assert sidebar_titles(page) == ["Renamed chat", "Second question"]
    delete = page.locator(".conv", has_text="Second question").locator("[data-action=delete]")
    delete.click()  # the first click asks, the second deletes
    assert sidebar_titles(page) == ["Renamed chat", "Second question"] and delete.inner_text() == "Delete?"
    delete.click()
    assert sidebar_titles(page) == ["Renamed chat"]

    page.reload()
    page.locator(".msg.assistant").nth(1).wait_for()
    assert sidebar_titles(page) == ["Renamed chat"]
    assert page.locator(".msg.user").all_inner_texts() == ["First question", "Follow-up"]
    page.locator(".conv [data-action=delete]").click()
    page.locator(".conv [data-action=delete]").click()  # the last one gone: an empty new chat
    assert sidebar_titles(page) == [] and page.locator(".msg").count() == 0
    page.reload()
    page.locator("#model option").first.wait_for(state="attached")
    assert sidebar_titles(page) == [] and page.locator(".msg").count() == 0

    page.click("#settings summary")
    page.fill("#max-tokens", "4000")  # deleted while it streams: the answer stops and nothing comes back
    send(page, "A long one")
    page.wait_for_function("() => document.querySelector('.msg.assistant .content').textContent.length > 0")
    page.locator(".conv [data-action=delete]").click()
    page.locator(".conv [data-action=delete]").click()
    page.locator("#send").wait_for(state="visible")
    page.wait_for_timeout(300)
    assert sidebar_titles(page) == [] and page.locator(".msg").count() == 0
    page.reload()
    page.locator("#model option").first.wait_for(state="attached")
    assert sidebar_titles(page) == []
    assert page.errors == []


def test_live_regenerate_and_edit_and_resend(page, live_server):
    open_live(page, live_server)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.url("/").rstrip("/"))
    bodies = chat_bodies(page)
    page.fill("#temperature", "1")  # sampled, no seed: every answer is a fresh draw
    page.fill("#max-tokens", "12")
    send(page, "Pick a word")
    first = answer_text(page)
    raw = page.evaluate("JSON.parse(localStorage.getItem('llmfn.conversations'))[0].messages[1].content")
    assert raw.strip() and first.strip()
    assert copied(page, page.locator(".turn.assistant [data-action=copy]")) == raw  # the answer as it came
    page.locator(".turn.assistant [data-action=regenerate]").click()
    second = answer_text(page)
    assert second != first and page.locator(".msg.assistant").count() == 1  # replaced, not added
    assert [m["content"] for m in bodies[-1]["messages"]] == ["Pick a word"]  # the old answer is not sent
    send(page, "Another")
    answered(page, 1)

    page.locator(".turn.user").first.locator("[data-action=edit]").click()  # edit the first question
    page.fill(".msg.editing textarea", "Pick a number")
    page.press(".msg.editing textarea", "Enter")
    answered(page)
    assert page.locator(".msg.user").all_inner_texts() == ["Pick a number"]  # later turns are cut
    assert page.locator(".msg.assistant").count() == 1
    assert [m["content"] for m in bodies[-1]["messages"]] == ["Pick a number"]
    page.reload()  # what is kept is the edited conversation
    answered(page)
    assert page.locator(".msg.user").all_inner_texts() == ["Pick a number"]
    assert page.errors == []


SAMPLING = {"temperature": ("1.0", 1.0), "top-p": ("0.95", 0.95), "top-k": ("100", 100), "min-p": ("0.01", 0.01),
            "repetition-penalty": ("1.1", 1.1), "presence-penalty": ("0.5", 0.5), "frequency-penalty": ("0.25", 0.25),
            "seed": ("1234", 1234)}  # fmt: skip


def test_live_sampling_settings_reach_the_server(page, live_server):
    open_live(page, live_server)
    bodies = chat_bodies(page)
    assert page.locator("#settings").get_attribute("open") is not None  # opened when it asked for the key
    for field, (text, _) in SAMPLING.items():
        page.fill(f"#{field}", text)
    page.fill("#max-tokens", "16")
    send(page, "Tell me something")
    seeded = answer_text(page)
    assert {k: bodies[-1].get(k.replace("-", "_")) for k in SAMPLING} == {k: v for k, (_, v) in SAMPLING.items()}
    assert bodies[-1]["max_tokens"] == 16 and "response_format" not in bodies[-1]
    meta = answered(page).locator(".meta").inner_text()
    assert re.fullmatch(r"16 tokens, [\d.]+ tok/s · first token [\d.]+ m?s · cut at max tokens", meta)
    assert float(re.search(r"([\d.]+) tok/s", meta).group(1)) > 0
    page.locator(".turn.assistant [data-action=regenerate]").click()
    assert answer_text(page) == seeded  # the same seed and settings: the same answer
    page.fill("#seed", "99")
    page.locator(".turn.assistant [data-action=regenerate]").click()
    assert answer_text(page) != seeded and bodies[-1]["seed"] == 99  # the server used the seed
    page.click("#reset-settings")  # back to the model's defaults: no knob is sent
    page.click("#reset")
    send(page, "Again")
    answered(page)
    assert not {k.replace("-", "_") for k in SAMPLING} & set(bodies[-1])

    page.fill("#top-p", "5")  # out of range: the server's 400 names the field, under the answer
    send(page, "Out of range")
    failed = page.locator(".msg.assistant").last.and_(page.locator("[data-state=error]"))
    assert "top_p" in failed.locator(".error").inner_text()
    page.fill("#top-p", "0.9")
    send(page, "In range")  # the failed turn is not sent again
    answered(page)
    assert [m["content"] for m in bodies[-1]["messages"]][-1:] == ["In range"] and len(bodies[-1]["messages"]) == 3
    assert page.errors == []


def test_live_json_schema_constrains_the_answer(page, live_server):
    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}, "sure": {"type": "boolean"}},
              "required": ["mood", "sure"], "additionalProperties": False}  # fmt: skip
    open_live(page, live_server)
    bodies = chat_bodies(page)
    assert page.locator("#settings").get_attribute("open") is not None  # opened when it asked for the key
    page.fill("#json-schema", "{not json")
    send(page, "How are you?")
    assert "JSON schema" in page.locator("#status").inner_text() and page.locator(".msg").count() == 0  # not sent
    assert page.locator("#input").input_value() == "How are you?"  # the question waits for a fix
    page.fill("#json-schema", json.dumps(schema))
    page.fill("#temperature", "1")
    page.fill("#max-tokens", "60")
    send(page, "How are you?")
    answer = answered(page)
    assert bodies[-1]["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    value = json.loads(answer.locator(".content pre code").inner_text())
    assert set(value) == {"mood", "sure"} and value["mood"] in ("happy", "sad") and isinstance(value["sure"], bool)
    assert answer.locator("pre code.language-json.hljs").count() == 1  # shown as highlighted JSON
    assert page.errors == []


def test_vendored_highlighter_ships_and_is_served(live_server):
    """highlight.js is in the wheel (pyproject's package-data covers every static file) and served at /static/."""
    package_data = re.search(r"^\[tool\.setuptools\.package-data\]\nllmfn = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), re.M)
    patterns = json.loads(package_data.group(1))
    package = ROOT / "src" / "llmfn"
    static = [f.relative_to(package).as_posix() for f in (package / "serve" / "static").rglob("*") if f.is_file()]
    assert "serve/static/vendor/highlight.min.js" in static
    assert [f for f in static if not any(fnmatch.fnmatchcase(f, p) for p in patterns)] == []
    page = httpx.get(live_server.url("/"), timeout=10).text
    for name, kind in [("highlight.min.js", "javascript"), ("github.min.css", "text/css"), ("github-dark.min.css", "text/css")]:
        assert f'"/static/vendor/{name}"' in page
        resp = httpx.get(live_server.url(f"/static/vendor/{name}"), timeout=10)
        assert resp.status_code == 200 and kind in resp.headers["content-type"]
        assert resp.content == (PAGE.parent / "vendor" / name).read_bytes()
