"""The OpenAI-compatible HTTP server: `run(config, host, port, workers)` serves
`llmfn.serve.app.create_app` on Granian's ASGI interface.

    from llmfn.serve import load_config, run
    run(load_config("server.toml"), host="127.0.0.1", port=8000, workers=1)

Each Granian worker is a separate process that loads its own copy of every model (N workers hold
N copies, and /metrics answers for the worker that serves the scrape). One worker is the default:
its engine already batches concurrent requests.
"""

from __future__ import annotations

import math
import os

from llmfn.serve.config import (
    CONFIG_ENV,
    ServerConfig,
    check_model_paths,
    encode_env,
    load_config,
    models_from_paths,
)

__all__ = ["ServerConfig", "load_config", "models_from_paths", "run"]


def run(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, *,
        log_access: bool = False) -> None:  # fmt: skip
    """Serve until interrupted. Raises LlmfnError (one line) for a model path that does not exist;
    a model that exists but fails to load stops the server with the error in the log."""
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings

    from llmfn.errors import LlmfnError
    from llmfn.serve.banner import URL_ENV, base_url
    from llmfn.serve.models import EXIT_ON_LOAD_ERROR_ENV

    if workers < 1:
        raise LlmfnError(f"--workers must be at least 1, got {workers}")
    if not 0 <= port <= 65535:
        raise LlmfnError(f"--port must be in [0, 65535], got {port}")
    check_model_paths(config)
    check_port(host, port)
    os.environ[CONFIG_ENV] = encode_env(config)  # read by create_app() in each worker process
    os.environ[EXIT_ON_LOAD_ERROR_ENV] = "1"
    limits = config.limits
    os.environ[URL_ENV] = base_url(host, port)  # for the ready banner each worker logs
    server = Granian(
        "llmfn.serve.app:create_app",
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        factory=True,
        log_access=log_access,
        backlog=1024,
        loop=Loops.asyncio,  # the shutdown drain (llmfn.serve.shutdown) hooks the asyncio loop's signals
        http1_settings=HTTP1Settings(header_read_timeout=math.ceil(limits.request_timeout * 1000)),
        # a worker that has not drained its requests by shutdown_timeout (+ time to stop the engine) is killed
        workers_kill_timeout=math.ceil(limits.shutdown_timeout) + 4,
    )
    server.serve()


def check_port(host: str, port: int) -> None:
    """Fail with one line when host:port is taken: Granian binds with SO_REUSEPORT, so a second
    server on a busy port would otherwise start and silently share it with the first."""
    import socket

    from llmfn.errors import LlmfnError

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise LlmfnError(f"cannot resolve --host {host!r}: {e}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise LlmfnError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
