"""Replicas (data parallel) on Ray Serve: `llmfn serve --replicas N [--ray-address ADDR]`.

Each replica is a Ray Serve deployment replica running the same ASGI app as the single-process
server (create_app: the same routes, auth, errors and engine), behind Ray Serve's one HTTP proxy at
--host:--port. Ray Serve routes each request to the less loaded of two replicas it samples (power of
two choices on the replicas' queue lengths), restarts a replica that dies, and runs on a Ray cluster
when --ray-address names one (else a local Ray on this host). Every response carries an
`x-llmfn-replica` header naming the replica that served it. Ray is an optional extra
(`pip install llmfn[ray]`); nothing else in llmfn imports it.

Known limits: a request in flight on a replica that dies gets Ray's own 500 (a plain-text body, not
an OpenAI error body); the other replicas keep serving and the next requests go to them."""

from __future__ import annotations

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
        return ReplicaHeader(create_app(config), name)


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
        env = None if ray_address else {"env_vars": {"PYTHONPATH": path}}
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
