"""Replicas (data parallel) on Ray Serve: `llmfn serve --replicas N [--ray-address ADDR]`.

Each replica is a Ray Serve deployment replica running the same ASGI app as the single-process
server (create_app: the same routes, auth, errors and engine; its models loaded before Ray routes to
it), behind Ray Serve's one HTTP proxy at
--host:--port. Ray Serve routes each request to the less loaded of two replicas it samples (power of
two choices on the replicas' queue lengths), restarts a replica that dies, and runs on a Ray cluster
when --ray-address names one (else a local Ray on this host). Every response carries an
`x-llmfn-replica` header naming the replica that served it. Ray is an optional extra
(`pip install llmfn[ray]`); nothing else in llmfn imports it.

A request in flight on a replica that dies fails cleanly: Ray's proxy would answer a plain-text 500
(or, once a stream has begun, cut it off); `ReplicaFailure`, a middleware Ray's proxy runs in front of
everything (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, which `start` sets for a Ray it starts; a
cluster joined with --ray-address needs it set where its nodes start, with llmfn importable there),
answers a 503 with an OpenAI error body and Retry-After instead, or ends the begun stream with an error
event and [DONE]. The other replicas keep serving and the next requests go to them."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from llmfn.errors import LlmfnError
from llmfn.serve.config import ServerConfig, check_model_paths, encode_env

REPLICA_HEADER = b"x-llmfn-replica"
APP_NAME = "llmfn"
log = logging.getLogger("llmfn.serve")


class ReplicaHeader:
    """ASGI middleware: names the replica in every HTTP response's headers."""

    def __init__(self, app, name: str):
        self.app, self.name = app, name.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.name)]}
            await send(message)

        return await self.app(scope, receive, named)


PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "llmfn.serve.replicas:proxy_middlewares"


class ReplicaFailure:
    """ASGI middleware in Ray's proxy: a request whose replica died (the proxy returns without a
    response, or stops a begun one short) ends as an OpenAI error, not a bare 500 or a cut connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "ended": False, "stream": False}

        async def watched(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                state["stream"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                      for k, v in message.get("headers", ()))  # fmt: skip
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            log.exception("the proxy failed a request")
        if state["ended"]:
            return
        from llmfn.serve.http import SSE_DONE, ApiError, sse
        from llmfn.serve.schemas import encoder

        error = ApiError(503, "the replica serving this request stopped; retry it (the other replicas serve)",
                         code="replica_failed")  # fmt: skip
        if not state["started"]:
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            messages = [{"type": "http.response.start", "status": 503, "headers": headers},
                        {"type": "http.response.body", "body": encoder.encode(error.body())}]  # fmt: skip
        elif state["stream"]:
            messages = [{"type": "http.response.body", "body": sse(error.body()) + SSE_DONE}]
        else:  # a JSON body cut short: nothing sound to add, end it
            messages = [{"type": "http.response.body", "body": b""}]
        with contextlib.suppress(Exception):  # the client may be gone (that too ends a request unanswered)
            for message in messages:
                await send(message)


def proxy_middlewares() -> list:
    """What Ray's proxy calls (PROXY_CALLBACK_ENV) for the middlewares it runs: ReplicaFailure."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailure)]


class Replica:
    """One Ray Serve replica: llmfn's ASGI app for the config it is given (JSON, as `run` passes it
    to Granian's workers), built in the replica's process."""

    def __init__(self, config_json: str):
        self.config_json = config_json

    def __serve_build_asgi_app__(self):
        import msgspec
        from ray import serve

        from llmfn.serve.app import create_app

        config = msgspec.json.decode(self.config_json, type=ServerConfig)
        name = serve.get_replica_context().replica_id.unique_id
        app = create_app(config)
        pool = _model_pool(app)
        pool.start()  # loaded before Ray counts the replica ready: no request meets a 503 "loading"
        if not pool.wait():
            raise LlmfnError(pool.error or "model loading failed")
        return ReplicaHeader(app, name)


def _model_pool(asgi):
    """The ModelPool of create_app's App, inside its middleware (access log, CORS, auth)."""
    while not hasattr(asgi, "pool"):
        asgi = asgi.app
    return asgi.pool


def application(config: ServerConfig, replicas: int, cpus_per_replica: float):
    """The Ray Serve application: `replicas` copies of Replica behind one ingress."""
    from ray import serve

    if replicas < 1:
        raise LlmfnError(f"--replicas must be at least 1, got {replicas}")
    limits = config.limits
    deployment = serve.deployment(
        serve.ingress()(Replica),
        name="llmfn",
        num_replicas=replicas,
        # as many requests as one engine admits (running + queued): its own queue does the batching
        max_ongoing_requests=limits.max_running + limits.max_queued,
        ray_actor_options={"num_cpus": cpus_per_replica},
        health_check_period_s=2,
    )
    return deployment.bind(encode_env(config))


def start(config: ServerConfig, host: str, port: int, replicas: int, ray_address: str | None = None,
          cpus_per_replica: float | None = None):  # fmt: skip
    """Start (or join) Ray, then Serve's proxy on host:port and the replicas; returns when they are up."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LlmfnError("--replicas needs Ray Serve: pip install 'llmfn[ray]'") from None
    check_model_paths(config)
    if not ray.is_initialized():
        # a local Ray's workers import the llmfn this process runs (a source checkout included)
        here = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # Ray's processes inherit it
        env = None if ray_address else {"env_vars": {"PYTHONPATH": path, PROXY_CALLBACK_ENV: PROXY_CALLBACK}}
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING, runtime_env=env)
    cpus = cpus_per_replica or max(1.0, ray.cluster_resources().get("CPU", 1.0) // max(replicas, 1))
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(application(config, replicas, cpus), name=APP_NAME, route_prefix="/")
    return serve


def run(config: ServerConfig, host: str, port: int, replicas: int, ray_address: str | None = None) -> None:
    """`llmfn serve --replicas N`: serve until interrupted, then shut Serve down."""
    serve = start(config, host, port, replicas, ray_address)
    print(f"llmfn: serving on http://{host}:{port} with {replicas} Ray Serve replica(s)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
