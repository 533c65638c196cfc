"""The OpenAI-compatible ASGI application: `create_app(config)`, its routes, lifespan and middleware.

Plain ASGI, no framework: a router of async handlers taking a `Request` (body already read under the
size limit) and returning a `Response` or a `StreamingResponse`. The handlers live by route family in
chat, completions, embeddings, tokens and admin, over the shared pieces in requests and generation.
Each request runs while a watcher waits for the client's disconnect; a disconnect cancels the
handler, which closes its engine iterator, which cancels the generation and frees its cache slot.

Run it with `llmfn serve`, or `granian --interface asgi --factory llmfn.serve.app:create_app`
(reading LLMFN_SERVE_CONFIG_FILE when set).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from functools import partial

from llmfn.serve import access_log, admin, chat, completions, embeddings, responses, tokens
from llmfn.serve.config import ServerConfig, api_keys, config_from_env
from llmfn.serve.generation import aclose
from llmfn.serve.http import (
    ApiError,
    BearerAuth,
    ClientGone,
    Cors,
    Request,
    Router,
    StreamingResponse,
    read_body,
    release_frames,
    shutting_down,
    too_deep,
    until_disconnect,
)
from llmfn.serve.metrics import Gauge, Metrics
from llmfn.serve.models import ModelPool
from llmfn.serve.openapi import ModelFacts, openapi
from llmfn.serve.schemas import encoder
from llmfn.serve.shutdown import Drain

log = logging.getLogger("llmfn.serve")


def create_app(config: ServerConfig | None = None):
    """The ASGI app for `config` (None: from the environment `run` sets, else the defaults), wrapped
    in bearer auth when API keys are configured, in CORS when origins are, and in the access log."""
    _setup_logging()
    config = config_from_env() if config is None else config
    keys = api_keys(config)
    app = App(config, auth=bool(keys))
    wrapped = BearerAuth(app, keys) if keys else app
    if config.cors_origins:
        wrapped = Cors(wrapped, config.cors_origins)
    if config.access_log.enabled:  # outermost: refused and preflight requests get their line too
        wrapped = access_log.AccessLog(wrapped, config.access_log.format)
    return wrapped


def _setup_logging() -> None:
    logger = logging.getLogger("llmfn")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s] llmfn: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


KV_GAUGES = (
    ("blocks_total", "KV cache blocks in the pool, by model."),
    ("blocks_used", "KV cache blocks held by running sequences, by model."),
    ("blocks_cached", "KV cache blocks kept for prefix reuse, by model."),
    ("prefix_hit_rate", "Share of prompt tokens whose KV came from the prefix cache, by model."),
    ("prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache (total), by model."),
    ("preemptions", "Sequences preempted for KV memory and recomputed (total), by model."),
)
SPEC_GAUGES = (
    ("drafted_tokens", "Tokens drafted by speculative decoding (total), by model."),
    ("accepted_tokens", "Drafted tokens the model confirmed (total), by model."),
)


class App:
    def __init__(self, config: ServerConfig, *, auth: bool = False):
        self.config = config
        self.auth = auth
        self.pool = ModelPool(config)
        self.metrics = Metrics()
        self.drain = Drain(config.limits.shutdown_timeout)
        self.metrics.gauges += [
            Gauge("llmfn_requests_running", "Generations decoding now, by model.", lambda: self._engine_stat("running")),
            Gauge("llmfn_requests_queued", "Generations waiting for a slot (queue depth), by model.", lambda: self._engine_stat("queued")),
            Gauge("llmfn_models_loaded", "1 once every model is loaded.", lambda: {(): float(self.pool.status == "ok")}),
            *(Gauge(f"llmfn_kv_{key}", text, partial(self._engine_stat, key)) for key, text in KV_GAUGES),
            *(Gauge(f"llmfn_speculative_{key}", text, partial(self._engine_stat, key)) for key, text in SPEC_GAUGES),
        ]  # fmt: skip
        self._openapi: bytes | None = None  # the document, once the models it describes are loaded
        # Each handler is bound to what it reads: the model pool, the metrics, the limits.
        pool, metrics, limits = self.pool, self.metrics, config.limits
        self.router = Router()
        for method, path, handler in (
            ("POST", "/v1/chat/completions", partial(chat.chat_completions, pool, metrics, limits)),
            ("POST", "/v1/completions", partial(completions.completions, pool, metrics, limits)),
            ("POST", "/v1/responses", partial(responses.responses, pool, metrics, limits)),
            ("POST", "/v1/embeddings", partial(embeddings.embeddings, pool, metrics)),
            ("GET", "/v1/models", partial(admin.list_models, pool)),
            ("GET", "/v1/models/{model}", partial(admin.get_model, pool)),
            ("POST", "/tokenize", partial(tokens.tokenize, pool)),
            ("POST", "/detokenize", partial(tokens.detokenize, pool)),
            ("GET", "/health", partial(admin.health, pool)),
            ("GET", "/metrics", partial(admin.prometheus, metrics)),
            ("GET", "/openapi.json", partial(admin.openapi_json, self.openapi_document)),
            ("GET", "/docs", admin.docs),
            ("GET", "/", admin.index),
            ("GET", "/static/{file}", admin.static),
        ):
            self.router.add(method, path, handler)

    # ------------------------------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            self.pool.start()  # servers without lifespan support load on the first request
            await self.http(scope, receive, send)

    async def lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if not self.auth:
                    log.warning("no API keys configured: the API is open to anyone who can reach it")
                self.pool.start()
                self.drain.install()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.pool.shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope, receive, send):
        started = time.perf_counter()
        route, status = "unmatched", 500
        response_started = False
        request: Request | None = None

        async def tracked_send(message):
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
            await send(message)

        limits, drain = self.config.limits, self.drain
        try:
            if drain.draining:
                raise shutting_down()
            handler, params, route = self.router.match(scope["method"], scope["path"])
            body = b""
            if scope["method"] in ("POST", "PUT", "PATCH"):
                declared = next(
                    (v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None
                )
                body = await drain.bounded(read_body(receive, limits.max_body_bytes, declared, limits.request_timeout))
            request = Request(scope, body, params)
            response = await until_disconnect(receive, drain.bounded(handler(request)))
            if isinstance(response, StreamingResponse):
                sending = response.send(tracked_send, keepalive=limits.sse_keepalive, stop=drain.deadline())
                await until_disconnect(receive, sending)
            else:
                await response.send(tracked_send, head=scope["method"] == "HEAD")
        except ApiError as e:
            if not response_started:
                await e.response().send(tracked_send)
            release_frames(e)
        except ClientGone:
            status = 499  # nginx's "client closed request", for the metrics only
        except RecursionError:  # a request nested deeper than a handler's recursion (schemas, tools)
            if not response_started:
                await too_deep().response().send(tracked_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not response_started:
                await (
                    ApiError(500, "internal server error (see the server log)", code="internal_error")
                    .response()
                    .send(tracked_send)
                )
        finally:
            for events in request.cleanup if request is not None else ():
                await aclose(events)
            self.metrics.requests.inc(route=route, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - started, route=route)

    def openapi_document(self) -> bytes:
        """This server's OpenAPI document: with its auth and limits, and once its models are loaded,
        what they take (token id ranges, the embedding size and limit)."""
        if self._openapi is not None:
            return self._openapi
        loaded = self.pool.status == "ok"
        document = encoder.encode(openapi(auth=self.auth, max_tokens=self.config.limits.max_tokens,
                                          served=self._served_facts() if loaded else None))  # fmt: skip
        if loaded:
            self._openapi = document
        return document

    def _served_facts(self) -> ModelFacts:
        names: dict[str, list[str]] = {}
        for name, served in self.pool.served.items():
            kinds = [served.kind, "any"] + (["chat"] if served.model.chat_template and served.kind == "causal-lm" else [])
            for kind in kinds:
                names.setdefault(kind, []).append(name)
        vocab: dict[str, int] = {}
        for served in self.pool.order:
            size = min(int(served.model.cfg.vocab_size), len(served.model.tokenizer))
            vocab[served.kind] = min(vocab.get(served.kind, size), size)
        embedders = [m for m in self.pool.order if m.kind == "embedding"]
        dims = {embeddings.dim(m) for m in embedders}
        by_name = {name: len(m.model.tokenizer) for name, m in self.pool.served.items()}
        return ModelFacts(names, vocab, by_name, min((m.context_length for m in embedders), default=None),
                          dims.pop() if len(dims) == 1 else None)  # fmt: skip

    def _engine_stat(self, key: str) -> dict:
        out = {}
        for served in list(self.pool.order):
            if served.engine is not None:
                with contextlib.suppress(Exception):
                    out[(("model", served.name),)] = float(served.engine.stats().get(key, 0))
        return out
