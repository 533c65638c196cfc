"""What a user sees (issue 21, "Feedback"): the server's access log and ready banner, the first-use
notes (a GGUF converted into the cache, C kernels compiled), `llmfn --version`, --compile's help
against what backend.should_compile does, and quantized GGUFs running on their own blocks by default
(`quantize=None` / "none" / a dtype dequantizes) in the library, the CLI and the server config."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

import llmfn
from llmfn.cli import commands as cli
from llmfn.errors import LlmfnError
from llmfn.serve import access_log
from llmfn.serve.config import ModelConfig, ServerConfig, load_config
from llmfn.serve.metrics import Metrics, Tracking
from server_util import start_server, write_config
from tiny import make_checkpoint

ALIAS = "smollm2-135m-instruct"


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines(monkeypatch):
    """The access logger's messages, captured in place of its stderr handler."""
    logger = logging.getLogger("llmfn.access")
    handler = Lines()
    monkeypatch.setattr(logger, "handlers", [handler])
    return handler.lines


def serve_once(app, path: str = "/v1/chat/completions", method: str = "POST") -> None:
    scope = {"type": "http", "method": method, "path": path, "client": ("10.0.0.7", 5555), "headers": []}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    asyncio.run(app(scope, receive, send))


def generation(model: str, prompt: int, completion: int) -> Tracking:
    """A metrics.Tracking as a generation route makes one, fed its last engine event."""
    track = Tracking(Metrics(), model, time.perf_counter())
    track.event(SimpleNamespace(token_ids=[1], prompt_tokens=prompt, completion_tokens=completion, finish_reason="stop"))
    return track


# ------------------------------------------------------------------------------------ the access log


def test_access_line_has_method_path_status_model_tokens_and_duration(access_lines):
    async def two_choices(scope, receive, send):  # n = 2: both generations count, as usage sums them
        generation("smol", 7, 5), generation("smol", 7, 3)
        await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    serve_once(access_log.AccessLog(two_choices, "text"))
    (line,) = access_lines
    head, seconds = line.rsplit(" ", 1)
    assert head == '10.0.0.7 "POST /v1/chat/completions" 200 model=smol prompt_tokens=14 completion_tokens=8'
    assert seconds.endswith("s") and 0.01 <= float(seconds[:-1]) < 5

    serve_once(access_log.AccessLog(two_choices, "json"))
    record = json.loads(access_lines[1])
    assert {k: record[k] for k in ("client", "method", "path", "status", "model", "prompt_tokens", "completion_tokens")} == {
        "client": "10.0.0.7", "method": "POST", "path": "/v1/chat/completions", "status": 200, "model": "smol",
        "prompt_tokens": 14, "completion_tokens": 8}  # fmt: skip
    assert 0.01 <= record["duration_s"] < 5 and record["time"].endswith("Z")


def test_access_line_without_tokens_and_without_a_response(access_lines):
    async def not_found(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def client_left(scope, receive, send):  # the app ends without starting a response
        access_log.note("minilm", prompt_tokens=9)

    serve_once(access_log.AccessLog(not_found), "/nowhere", "GET")
    serve_once(access_log.AccessLog(client_left), "/v1/embeddings")
    assert access_lines[0].startswith('10.0.0.7 "GET /nowhere" 404 ') and "model=" not in access_lines[0]
    assert access_lines[1].startswith('10.0.0.7 "POST /v1/embeddings" 499 model=minilm prompt_tokens=9 completion_tokens=0 ')
    access_log.note("outside a request", prompt_tokens=1)  # no record: nothing to count, no error

    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        serve_once(access_log.AccessLog(broken), "/v1/completions")
    assert access_lines[2].startswith('10.0.0.7 "POST /v1/completions" 500 ')


def test_access_log_on_by_default_and_switched_by_flags_and_config(tmp_path):
    from llmfn.serve.app import create_app

    app = create_app(ServerConfig())
    assert isinstance(app, access_log.AccessLog) and app.pool is app.inner.pool  # the App's attributes read through
    config = cli.serve_overrides(ServerConfig(), None, None, access_log=False)
    assert not isinstance(create_app(config), access_log.AccessLog)
    args = cli.build_parser().parse_args(["serve", "--no-access-log", "--access-log-format", "json"])
    assert (args.access_log, args.access_log_format) == (False, "json")
    assert cli.build_parser().parse_args(["serve"]).access_log is None  # unset: the config decides
    file = write_config(tmp_path, [{"name": "m", "path": "/m"}], access_log={"enabled": True, "format": "json"})
    assert load_config(file).access_log.format == "json"
    assert cli.serve_overrides(load_config(file), None, None, access_log_format="text").access_log.format == "text"
    bad = write_config(tmp_path, [{"name": "m", "path": "/m"}], access_log={"format": "xml"}, name="bad.toml")
    with pytest.raises(LlmfnError, match="access_log.format"):
        load_config(bad)


@pytest.mark.slow
def test_server_logs_each_request_and_a_ready_banner(tmp_path):
    """The real server (Granian subprocess) with the access log in JSON: one parseable line per request
    with the token counts its answer reported, and the banner with the URLs once the model is ready."""
    import openai

    folder = tmp_path / "tiny"
    make_checkpoint(folder, "llama", seed=3)
    config = write_config(tmp_path, [{"name": "tiny", "path": str(folder)}], access_log={"format": "json"})
    with start_server(config, ready_timeout=120, log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=60)
        whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
        chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=4, stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
        assert httpx.get(server.url("/v1/models/nope")).status_code == 404
        deadline = time.monotonic() + 10
        while server.log().count('"path": ') < 4 and time.monotonic() < deadline:  # /health, then our three
            time.sleep(0.1)
        log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    by_path = {(r["method"], r["path"]): r for r in lines}
    chat = by_path["POST", "/v1/chat/completions"]
    assert (chat["status"], chat["model"]) == (200, "tiny")
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    completion = by_path["POST", "/v1/completions"]
    assert (completion["prompt_tokens"], completion["completion_tokens"]) == (chunks[-1].usage.prompt_tokens,
                                                                              chunks[-1].usage.completion_tokens)  # fmt: skip
    assert by_path["GET", "/v1/models/nope"]["status"] == 404 and by_path["GET", "/health"]["client"] == "127.0.0.1"
    for where in (f"web chat      {server.base_url}/", f"API docs      {server.base_url}/docs",
                  f"OpenAI API    {server.base_url}/v1"):  # fmt: skip
        assert where in log, log
    assert "ready: tiny (causal-lm)" in log
    assert log.index("ready: tiny") < log.index('"path": "/v1/chat/completions"')


def test_banner_urls():
    from llmfn.serve.banner import base_url, ready_banner

    assert base_url("0.0.0.0", 8000) == "http://localhost:8000" and base_url("::1", 80) == "http://[::1]:80"
    text = ready_banner([("chat", "causal-lm"), ("emb", "embedding")], "http://h:1")
    assert text.splitlines()[0] == "ready: chat (causal-lm), emb (embedding)"
    assert "http://h:1/docs" in text and "OPENAI_BASE_URL=http://h:1/v1" in text


# ------------------------------------------------------------------------------------ first-use notes


def test_gguf_first_use_is_logged_once(tmp_path, monkeypatch, caplog):
    from llmfn.loading.gguf import LogProgress, converted_folder
    from llmfn.loading.registry import ALIASES, package_path

    monkeypatch.setenv("LLMFN_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, logger="llmfn.loading")
    gguf = package_path(ALIASES[ALIAS])
    out = converted_folder(gguf, "smol", weights=False)  # config and tokenizer: what a quantized load needs
    notes = [r.getMessage() for r in caplog.records]
    assert notes[0] == f"first use of {gguf.name}: converting its config and tokenizer into {out}"
    assert notes[1].startswith(f"converted {gguf.name} in ") and notes[1].endswith("s") and len(notes) == 2
    converted_folder(gguf, "smol", weights=False)
    assert len(caplog.records) == 2  # done once: the second use says nothing

    progress = LogProgress("converting x")
    for done in range(1, 9):
        progress(done, 8, f"t{done}")
    assert [r.getMessage() for r in caplog.records[2:]] == [
        "converting x: 25% (2/8 tensors)", "converting x: 50% (4/8 tensors)", "converting x: 75% (6/8 tensors)"]


def test_c_build_is_logged_with_its_duration(tmp_path, monkeypatch, caplog):
    from llmfn import cbuild

    if cbuild.compiler() is None:
        pytest.skip("needs a C compiler (cc, gcc or clang)")
    monkeypatch.setenv("LLMFN_HOME", str(tmp_path))
    monkeypatch.setattr(cbuild, "_loaded", {})
    monkeypatch.setattr(cbuild, "FLAGS", ["-O0" if f == "-O3" else f for f in cbuild.FLAGS])  # a quick build
    caplog.set_level(logging.INFO, logger="llmfn.cbuild")
    assert cbuild.load("spm_log_test", "spm.c", {}) is not None
    notes = [r.getMessage() for r in caplog.records]
    assert notes[0] == f"building the C kernels spm_log_test (first use on this machine) into {tmp_path / 'kernels'}"
    assert notes[1].startswith("built spm_log_test in ") and len(notes) == 2
    monkeypatch.setattr(cbuild, "_loaded", {})
    assert cbuild.load("spm_log_test", "spm.c", {}) is not None and len(caplog.records) == 2  # built already


# ------------------------------------------------------------------------------------ the command line


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"llmfn {version('llmfn')}\n"


def test_compile_help_says_what_should_compile_does(tmp_path, monkeypatch):
    from llmfn import backend

    for command in ("chat", "bench"):
        text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices[command].format_help().split())
        assert "(default: off on CPU, where it does not pay; on on CUDA for models of 50M+ parameters)" in text
    make_checkpoint(tmp_path)
    model = llmfn.load(tmp_path)
    monkeypatch.delenv("LLMFN_COMPILE", raising=False)
    monkeypatch.setattr(backend, "COMPILE_MIN_PARAMS", 0)  # big enough for CUDA's rule: still off on CPU
    assert backend.should_compile(model) is False
    assert llmfn.load(tmp_path, compile=True).extra["compile"] is True


def test_quantize_on_every_command_and_in_the_server_config(tmp_path):
    parse = cli.build_parser().parse_args
    for argv in (["chat"], ["run", "hi"], ["bench"]):
        assert parse(argv).quantize == "auto" and parse([*argv, "--quantize", "none"]).quantize == "none"
    assert parse(["serve"]).quantize is None  # unset: each model's own
    config = cli.serve_overrides(load_config(None), None, None, quantize="none")
    assert [(m.type, m.quantize) for m in config.models] == [("causal-lm", "none"), ("embedding", "auto")]
    file = write_config(tmp_path, [{"name": "a", "path": "/a.gguf", "quantize": "none"}, {"name": "b", "path": "/b"}])
    assert [m.quantize for m in load_config(file).models] == ["none", "auto"]
    bad = write_config(tmp_path, [{"name": "a", "path": "/a", "quantize": "int3"}], name="bad.toml")
    with pytest.raises(LlmfnError, match=r"models\[0\]\.quantize"):
        load_config(bad)


def test_what_quantize_does_to_each_source(tmp_path):
    from llmfn.loading import effective_quantize

    gguf, folder = tmp_path / "m.gguf", tmp_path
    assert effective_quantize(gguf, None, "auto") == "int4"  # its own Q4_0 / Q4_1 / Q8_0 blocks
    assert effective_quantize(gguf, "float32", "auto") is None  # a dtype asks for dense weights
    assert effective_quantize(gguf, None, None) is None and effective_quantize(gguf, None, "none") is None
    assert effective_quantize(folder, None, "auto") is None  # a folder loads as stored
    assert effective_quantize(folder, None, "rtn-int8") == "int8"
    with pytest.raises(LlmfnError, match="unknown quantization"):
        effective_quantize(folder, None, "int3")


@pytest.mark.slow
def test_the_default_gguf_runs_on_its_blocks_and_answers_paris():
    from llmfn.kernels.quant import Int4Weight, Int8Weight
    from llmfn.serve.models import load_model

    model = llmfn.load(ALIAS)
    assert isinstance(model.params["layers"][0]["wqkv"], Int4Weight)  # Q4_1
    assert isinstance(model.params["embed"], Int8Weight)  # Q8_0
    stream = llmfn.chat(model, [{"role": "user", "content": "What is the capital of France?"}], max_tokens=40,
                        temperature=0.0)  # fmt: skip
    assert "Paris" in stream.text() and stream.finish_reason == "stop"
    dense = load_model(ModelConfig(name="s", path=ALIAS, quantize="none"))  # the server's per-model switch
    assert isinstance(dense.params["layers"][0]["wqkv"], torch.Tensor)
    ids = torch.tensor([model.tokenizer.encode("The capital of France is")])
    quantized, exact = llmfn.logits(model, ids), llmfn.logits(dense, ids)
    assert (quantized - exact).abs().max().item() < 5e-3  # the same bits: arithmetic differences only
    assert torch.equal(quantized.argmax(-1), exact.argmax(-1))


def test_no_benchmark_script_shadows_a_package():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path: a script named like an installed
    package (kernels.py once hid the `kernels` package transformers imports) breaks that import."""
    import importlib.util
    import subprocess
    import sys

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    scripts = sorted(p.stem for p in benchmarks.glob("*.py"))
    assert "decode" in scripts
    specs = {name: importlib.util.find_spec(name) for name in scripts}
    installed = {name: spec.origin for name, spec in specs.items()
                 if spec is not None and not str(spec.origin).startswith(str(benchmarks.parent))}  # (tests/ is on the path)
    assert installed == {}
    done = subprocess.run([sys.executable, "-c", "import transformers; from transformers import LlamaForCausalLM"],
                          capture_output=True, text=True, timeout=300, cwd=benchmarks)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
