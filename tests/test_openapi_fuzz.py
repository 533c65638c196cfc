"""The OpenAPI document against the server it describes, with schemathesis: its default run (the
examples, coverage, fuzzing and stateful phases, valid and invalid requests), then a positive-mode
fuzzing pass, over a live server (a tiny random chat model with a 4k context and all-MiniLM-L6-v2,
behind an API key). Every schema-valid request must be answered 2xx (or 404 / 429), every invalid one
4xx, never a 5xx, and every answer must match the document (status, content type, schema, each SSE
event). About a minute in all; the seed is fixed so that a failure reproduces.

Fields whose value is a program (a JSON Schema, a regex, a grammar, tools) are left out of the valid
requests: see tests/schemathesis_hooks.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_util import start_server, write_config
from tiny import make_checkpoint

pytestmark = pytest.mark.slow

KEY = "sk-fuzz"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openapi-fuzz")
    make_checkpoint(folder / "tiny", "llama", seed=3, max_position_embeddings=4096)
    config = write_config(folder, [{"name": "tiny", "path": str(folder / "tiny")},
                                   {"name": "minilm", "path": "all-minilm-l6-v2", "type": "embedding"}],
                          api_keys=[KEY], limits={"max_tokens": 16, "max_running": 4, "max_queued": 1024})  # fmt: skip
    with start_server(config, ready_timeout=240, log_dir=folder) as srv:
        yield srv


def schemathesis(server, *args: str, seconds: int) -> subprocess.CompletedProcess:
    """`st run` against the server's /openapi.json (one worker: hypothesis' generation is not thread-safe)."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    command = [sys.executable, "-m", "schemathesis.cli", "run", server.url("/openapi.json"),
               "-H", f"Authorization: Bearer {KEY}", "--seed", "21", "-w", "1", "--request-timeout", "60",
               "--max-time", str(seconds), "--no-color", *args]  # fmt: skip
    # run in the server's scratch folder: schemathesis leaves a .schemathesis/ cache where it runs
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 120,
                          cwd=server.log_file.parent)  # fmt: skip


def test_schemathesis_default_run(server):
    done = schemathesis(server, "--max-examples", "10", seconds=40)
    assert done.returncode == 0 and "No issues found" in done.stdout, done.stdout[-6000:] + done.stderr[-2000:]


def test_schemathesis_positive_fuzzing(server):
    done = schemathesis(server, "--phases", "fuzzing", "--mode", "positive", seconds=20)
    assert done.returncode == 0 and "No issues found" in done.stdout, done.stdout[-6000:] + done.stderr[-2000:]
    assert "passed" in done.stdout and server.alive()
