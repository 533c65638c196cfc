"""Start the real server (Granian, `python -m llmfn.serve`) as a subprocess on a free port.

    with start_server(write_config(tmp_path, [{"name": "tiny", "path": str(folder)}])) as server:
        httpx.get(server.url("/health"))
        openai.OpenAI(base_url=server.url("/v1"), api_key="x")

`command` replaces the launcher (e.g. ["llmfn", "serve"]); --config/--host/--port are appended.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# GGUF aliases convert once into LLMFN_HOME; a fixed folder keeps that to one conversion per machine
TEST_HOME = Path(os.environ.get("LLMFN_TEST_HOME", Path(tempfile.gettempdir()) / "llmfn-test-home"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: access_log={"format": "json"}
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(folder: Path, models: list[dict], *, limits: dict | None = None, name: str = "server.toml",
                 **top) -> Path:  # fmt: skip
    """A TOML config: top-level keys (api_keys, cors_origins, access_log as a dict), [limits], then
    [[models]] tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    if limits:
        lines += ["", "[limits]"] + [f"{k} = {_toml_value(v)}" for k, v in limits.items()]
    for m in models:
        lines += ["", "[[models]]"] + [f"{k} = {_toml_value(v)}" for k, v in m.items()]
    file = Path(folder) / name
    file.write_text("\n".join(lines) + "\n")
    return file


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_file: Path
    host: str = "127.0.0.1"
    extra: dict = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "") -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        """Poll /health until 200; raise with the server log if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 20) -> int:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(config: Path | None = None, *, args: list[str] = (), env: dict | None = None,
                 command: list[str] | None = None, ready_timeout: float = 240, wait: bool = True,
                 log_dir: Path | None = None) -> Server:  # fmt: skip
    """Launch the server in its own process group; with wait, return once /health is 200."""
    port = free_port()
    cmd = list(command or [sys.executable, "-m", "llmfn.serve"])
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, "LLMFN_HOME": str(TEST_HOME), "PYTHONUNBUFFERED": "1", **(env or {})}
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="llmfn-server-"))
    log_file = log_dir / f"server-{port}.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    server = Server(proc, port, log_file)
    if wait:
        try:
            server.wait_ready(ready_timeout)
        except BaseException:
            server.stop()
            raise
    return server


def app_of(asgi):
    """The llmfn App inside create_app's middleware (access log, CORS, auth), to drive its model pool."""
    while not hasattr(asgi, "pool"):
        asgi = asgi.app
    return asgi
