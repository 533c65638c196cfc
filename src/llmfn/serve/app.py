"""The OpenAI-compatible ASGI application: `create_app(config)`.

Plain ASGI, no framework: a router of async handlers taking a `Request` (body already read under the
size limit) and returning a `Response` or a `StreamingResponse`. Each request runs while a watcher
waits for the client's disconnect; a disconnect cancels the handler, which closes its engine
iterator, which cancels the generation and frees its cache slot.

Run it with `llmfn serve`, or `granian --interface asgi --factory llmfn.serve.app:create_app`
(reading LLMFN_SERVE_CONFIG_FILE when set).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import mimetypes
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from msgspec import UNSET

from llmfn.chat_template import apply_chat_template
from llmfn.errors import LlmfnError, RequestError
from llmfn.sampling import SamplingParams
from llmfn.serve import schemas as s
from llmfn.serve.config import ServerConfig, api_keys, config_from_env
from llmfn.serve.http import (
    SSE_DONE,
    ApiError,
    BearerAuth,
    ClientGone,
    Cors,
    Request,
    Response,
    Router,
    StreamingResponse,
    read_body,
    sse,
    until_disconnect,
)
from llmfn.serve.metrics import Gauge, Metrics
from llmfn.serve.models import ModelPool, Served
from llmfn.serve.openapi import DOCS_HTML, openapi

log = logging.getLogger("llmfn.serve")
STATIC = Path(__file__).parent / "static"
MAX_EMBEDDING_INPUTS = 2048
MAX_PROMPTS = 64


def create_app(config: ServerConfig | None = None):
    """The ASGI app for `config` (None: from the environment `run` sets, else the defaults), wrapped
    in bearer auth when API keys are configured and in CORS when origins are."""
    _setup_logging()
    config = config_from_env() if config is None else config
    keys = api_keys(config)
    app = App(config, auth=bool(keys))
    wrapped = BearerAuth(app, keys) if keys else app
    if config.cors_origins:
        wrapped = Cors(wrapped, config.cors_origins)
    return wrapped


def _setup_logging() -> None:
    logger = logging.getLogger("llmfn")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s] llmfn: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class App:
    def __init__(self, config: ServerConfig, *, auth: bool = False):
        self.config = config
        self.auth = auth
        self.pool = ModelPool(config)
        self.metrics = Metrics()
        self.metrics.gauges += [
            Gauge("llmfn_requests_running", "Generations decoding now, by model.", lambda: self._engine_stat("running")),
            Gauge("llmfn_requests_queued", "Generations waiting for a slot (queue depth), by model.", lambda: self._engine_stat("queued")),
            Gauge("llmfn_models_loaded", "1 once every model is loaded.", lambda: {(): float(self.pool.status == "ok")}),
        ]  # fmt: skip
        self.openapi = s.encoder.encode(openapi())
        self.router = Router()
        for method, path, handler in (
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/embeddings", self.embeddings),
            ("GET", "/v1/models", self.list_models),
            ("GET", "/v1/models/{model}", self.get_model),
            ("POST", "/tokenize", self.tokenize),
            ("POST", "/detokenize", self.detokenize),
            ("GET", "/health", self.health),
            ("GET", "/metrics", self.prometheus),
            ("GET", "/openapi.json", self.openapi_json),
            ("GET", "/docs", self.docs),
            ("GET", "/", self.index),
            ("GET", "/static/{file}", self.static),
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

        try:
            handler, params, route = self.router.match(scope["method"], scope["path"])
            body = b""
            if scope["method"] in ("POST", "PUT", "PATCH"):
                declared = next(
                    (v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None
                )
                body = await read_body(receive, self.config.limits.max_body_bytes, declared)
            request = Request(scope, body, params)
            response = await until_disconnect(receive, handler(request))
            if isinstance(response, StreamingResponse):
                await until_disconnect(receive, response.send(tracked_send))
            else:
                await response.send(tracked_send, head=scope["method"] == "HEAD")
        except ApiError as e:
            if not response_started:
                await e.response().send(tracked_send)
        except ClientGone:
            status = 499  # nginx's "client closed request", for the metrics only
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
                await _aclose(events)
            self.metrics.requests.inc(route=route, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - started, route=route)

    def _engine_stat(self, key: str) -> dict:
        out = {}
        for served in list(self.pool.order):
            if served.engine is not None:
                with contextlib.suppress(Exception):
                    out[(("model", served.name),)] = float(served.engine.stats().get(key, 0))
        return out

    # ------------------------------------------------------------------------------------------ chat

    async def chat_completions(self, req: Request):
        body = req.decode(s.ChatCompletionRequest)
        _check_common(body.n, body.stream_options, body.stream)
        if body.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")
        if body.response_format is not None and body.response_format.type != "text":
            raise ApiError(
                400,
                f"response_format {body.response_format.type!r} is not supported (only 'text')",
                param="response_format",
            )
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        served = self.pool.get(body.model, "causal-lm")
        model = served.model
        if not model.chat_template:
            raise ApiError(
                400, f"the model {served.name!r} has no chat template; use /v1/completions", param="model"
            )
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        prompt = _request_error(lambda: apply_chat_template(model.tokenizer, model.chat_template, messages))
        max_tokens = self._max_tokens(served, len(prompt), body.max_completion_tokens or body.max_tokens, "messages",
                                      "max_completion_tokens" if body.max_completion_tokens else "max_tokens")  # fmt: skip
        request = _generation_request(
            prompt, max_tokens, body, (body.top_logprobs or 0) if body.logprobs else None
        )
        t0 = time.perf_counter()
        first, events = await self._open(req, served, request)
        track = Tracking(self.metrics, served.name, t0)
        name = body.model or served.name
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(served, first, events, track, cid, created, name,
                                                       include_usage, body.logprobs))  # fmt: skip
        text, logprobs, last = [], [], None
        try:
            async for ev in _chain(first, events):
                track.event(ev)
                _raise_event_error(ev)
                text.append(ev.text)
                if body.logprobs:
                    logprobs += _token_logprobs(served, ev)
                last = ev
        finally:
            track.close()
        choice = s.ChatChoice(0, s.AssistantMessage("assistant", "".join(text)),
                              s.ChoiceLogprobs(logprobs) if body.logprobs else None, _finish(last))  # fmt: skip
        return Response.json(s.ChatCompletion(cid, created, name, [choice], _usage(last)))

    async def _chat_stream(
        self, served, first, events, track, cid, created, name, include_usage, want_logprobs
    ) -> AsyncIterator[bytes]:
        usage = None if include_usage else UNSET

        def chunk(delta: s.ChatDelta, finish: str | None = None, logprobs=None) -> bytes:
            choice = s.ChatChunkChoice(0, delta, logprobs, finish)
            return sse(s.ChatCompletionChunk(cid, created, name, [choice], usage=usage))

        try:
            yield chunk(s.ChatDelta(role="assistant", content=""))
            async for ev in _chain(first, events):
                track.event(ev)
                if _event_error(ev):
                    yield sse(_event_error(ev).body())
                    break
                lp = s.ChoiceLogprobs(_token_logprobs(served, ev)) if want_logprobs and ev.token_ids else None
                if ev.text or lp is not None:
                    yield chunk(s.ChatDelta(content=ev.text), logprobs=lp)
                if ev.finish_reason is not None:
                    yield chunk(s.ChatDelta(), _finish(ev))
                    if include_usage:
                        yield sse(s.ChatCompletionChunk(cid, created, name, [], usage=_usage(ev)))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            log.exception("stream failed")
            yield sse(ApiError(500, f"generation failed: {e}", code="internal_error").body())
        finally:
            track.close()
        yield SSE_DONE

    # ------------------------------------------------------------------------------------------ completions

    async def completions(self, req: Request):
        body = req.decode(s.CompletionRequest)
        _check_common(body.n, body.stream_options, body.stream)
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", param="best_of")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        served = self.pool.get(body.model, "causal-lm")
        prompts = _prompts(served, body.prompt)
        requests = []
        for ids in prompts:
            max_tokens = self._max_tokens(served, len(ids), body.max_tokens, "prompt", "max_tokens")
            requests.append(_generation_request(ids, max_tokens, body, body.logprobs))
        t0 = time.perf_counter()
        opened = [await self._open(req, served, r) for r in requests]  # req.cleanup closes them on any exit
        tracks = [Tracking(self.metrics, served.name, t0) for _ in opened]
        name = body.model or served.name
        cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
        echoes = [served.model.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
        streams = [_chain(first, events) for first, events in opened]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(served, streams, tracks, echoes, cid, created, name,
                                                             include_usage, body.logprobs))  # fmt: skip

        async def collect(i: int):
            text, last = [echoes[i]], None
            lp = _CompletionLogprobs(served) if body.logprobs is not None else None
            try:
                async for ev in streams[i]:
                    tracks[i].event(ev)
                    _raise_event_error(ev)
                    text.append(ev.text)
                    if lp is not None:
                        lp.add(ev, len("".join(text)) - len(ev.text))
                    last = ev
            finally:
                tracks[i].close()
            return s.CompletionChoice(i, "".join(text), lp.result() if lp else None, _finish(last)), last

        results = await asyncio.gather(*(collect(i) for i in range(len(streams))))
        usage = _sum_usage([last for _, last in results])
        return Response.json(s.Completion(cid, created, name, [c for c, _ in results], usage=usage))

    async def _completion_stream(
        self, served, streams, tracks, echoes, cid, created, name, include_usage, logprobs
    ) -> AsyncIterator[bytes]:
        usage = None if include_usage else UNSET

        def chunk(i: int, text: str, finish: str | None = None, lp=None) -> bytes:
            return sse(
                s.Completion(cid, created, name, [s.CompletionChoice(i, text, lp, finish)], usage=usage)
            )

        lasts: list = [None] * len(streams)
        offsets = [len(e) for e in echoes]
        try:
            for i, echo in enumerate(echoes):
                if echo:
                    yield chunk(i, echo)
            async with contextlib.aclosing(_merge(streams)) as merged:
                async for i, ev in merged:
                    tracks[i].event(ev)
                    lasts[i] = ev
                    if _event_error(ev):
                        yield sse(_event_error(ev).body())
                        break
                    lp = None
                    if logprobs is not None and ev.token_ids:
                        acc = _CompletionLogprobs(served)
                        acc.add(ev, offsets[i])
                        lp = acc.result()
                    offsets[i] += len(ev.text)
                    if ev.text or lp is not None:
                        yield chunk(i, ev.text, lp=lp)
                    if ev.finish_reason is not None:
                        yield chunk(i, "", _finish(ev))
                else:
                    if include_usage:
                        yield sse(s.Completion(cid, created, name, [], usage=_sum_usage(lasts)))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            log.exception("stream failed")
            yield sse(ApiError(500, f"generation failed: {e}", code="internal_error").body())
        finally:
            for track in tracks:
                track.close()
        yield SSE_DONE

    # ------------------------------------------------------------------------------------------ generation plumbing

    def _max_tokens(
        self, served: Served, n_prompt: int, requested: int | None, prompt_param: str, param: str
    ) -> int:
        """The request's max_tokens, checked against the context and the server's limit; when it gives
        none, what the context leaves, capped by the limit (as vLLM does)."""
        context, limit = served.context_length, self.config.limits.max_tokens
        if n_prompt == 0:
            raise ApiError(400, "the prompt is empty", param=prompt_param)
        if requested is None:
            if n_prompt >= context:
                raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                    f"{n_prompt} tokens, which leaves no room for a completion", param=prompt_param)  # fmt: skip
            return min(context - n_prompt, limit)
        if n_prompt + requested > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has {n_prompt} "
                                f"tokens and {param} asks for {requested} more ({n_prompt + requested} in all)",
                           param=param, code="context_length_exceeded")  # fmt: skip
        if requested > limit:
            raise ApiError(400, f"{param} is {requested}, over this server's limit of {limit}", param=param)
        return requested

    async def _open(self, req: Request, served: Served, request):
        """Submit to the engine and wait for its first event, so that a rejected request (bad
        parameter, full queue) is still an HTTP error rather than a broken stream. The iterator is
        registered on req.cleanup: however the request ends, the server closes it (cancelling the
        generation if it still runs)."""
        try:
            events = served.engine.submit(request)
            if inspect.isawaitable(events):
                events = await events
            req.cleanup.append(events)
            first = await anext(events)
        except LlmfnError as e:
            raise _engine_error(e) from None
        if _event_error(first) is not None:
            raise _event_error(first)
        return first, events

    # ------------------------------------------------------------------------------------------ embeddings

    async def embeddings(self, req: Request):
        body = req.decode(s.EmbeddingRequest)
        served = self.pool.get(body.model, "embedding")
        inputs = _embedding_inputs(body.input, served.model.cfg.vocab_size)
        dim = _embedding_dim(served)
        if body.dimensions is not None and body.dimensions != dim:
            raise ApiError(
                400,
                f"dimensions must be {dim} for {served.name!r} (it cannot be changed)",
                param="dimensions",
            )

        def run():
            from llmfn.embed import embed_with_usage

            return embed_with_usage(served.model, inputs)

        try:
            vectors, n_tokens = await asyncio.wrap_future(self.pool.run(run))
        except LlmfnError as e:
            raise _engine_error(e) from None
        self.metrics.prompt_tokens.inc(n_tokens, model=served.name)
        if body.encoding_format == "base64":
            rows = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            rows = vectors.tolist()
        data = [s.Embedding(i, row) for i, row in enumerate(rows)]
        return Response.json(
            s.EmbeddingList(data, body.model or served.name, s.EmbeddingUsage(n_tokens, n_tokens))
        )

    # ------------------------------------------------------------------------------------------ models, tokenizer

    async def list_models(self, req: Request):
        self.pool.ready()
        cards = [self._card(name, served) for name, served in self.pool.served.items()]
        return Response.json(s.ModelList(cards))

    async def get_model(self, req: Request):
        name = req.path_params["model"]
        served = self.pool.get(name)
        return Response.json(self._card(name, served))

    @staticmethod
    def _card(name: str, served: Served) -> s.ModelCard:
        return s.ModelCard(
            name, served.created, root=served.name, type=served.kind, max_model_len=served.context_length
        )

    async def tokenize(self, req: Request):
        body = req.decode(s.TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        served = self.pool.get(body.model)
        model = served.model
        if body.messages is not None:
            if not model.chat_template:
                raise ApiError(400, f"the model {served.name!r} has no chat template", param="messages")
            messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
            ids = _request_error(lambda: apply_chat_template(model.tokenizer, model.chat_template, messages,
                                                             add_generation_prompt=body.add_generation_prompt))  # fmt: skip
        else:
            ids = model.tokenizer.encode_prompt(body.prompt)
        return Response.json(s.TokenizeResponse(len(ids), served.context_length, ids))

    async def detokenize(self, req: Request):
        body = req.decode(s.DetokenizeRequest)
        served = self.pool.get(body.model)
        vocab = len(served.model.tokenizer)
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is out of range [0, {vocab})", param="tokens")
        return Response.json(s.DetokenizeResponse(served.model.tokenizer.decode(body.tokens)))

    # ------------------------------------------------------------------------------------------ health, metrics, docs, static

    async def health(self, req: Request):
        pool = self.pool
        if pool.status == "ok":
            return Response.json(s.Health("ok", [x.name for x in pool.order]))
        status = 503
        return Response.json(s.Health(pool.status, error=pool.error), status, [(b"retry-after", b"2")])

    async def prometheus(self, req: Request):
        return Response.text(self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")

    async def openapi_json(self, req: Request):
        return Response(200, self.openapi, [(b"content-type", b"application/json")])

    async def docs(self, req: Request):
        return Response.text(DOCS_HTML, b"text/html; charset=utf-8")

    async def index(self, req: Request):
        page = STATIC / "index.html"
        if page.is_file():
            return Response(200, page.read_bytes(), [(b"content-type", b"text/html; charset=utf-8")])
        return Response.text('<!doctype html><title>llmfn</title><p>llmfn is running: see <a href="/docs">/docs</a>, '
                             '<a href="/v1/models">/v1/models</a> and <a href="/health">/health</a>.</p>',
                             b"text/html; charset=utf-8")  # fmt: skip

    async def static(self, req: Request):
        root = STATIC.resolve()
        file = (root / req.path_params["file"]).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise ApiError(404, f"no static file {req.path_params['file']!r}", code="not_found")
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
            kind += "; charset=utf-8"
        return Response(
            200, file.read_bytes(), [(b"content-type", kind.encode()), (b"cache-control", b"no-cache")]
        )


# ---------------------------------------------------------------------------------------------- helpers


class Tracking:
    """Per-generation metrics: time to first token, time per output token, token counts."""

    def __init__(self, metrics: Metrics, model: str, t0: float):
        self.metrics, self.model, self.t0 = metrics, model, t0
        self.first: float | None = None
        self.last = None
        self.closed = False

    def event(self, ev) -> None:
        self.last = ev
        if self.first is None and ev.token_ids:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.t0, model=self.model)

    def close(self) -> None:
        """Record the outcome once; a generation that ended without a finish_reason was abandoned
        (client gone, or an error) and counts as "cancelled"."""
        if self.closed:
            return
        self.closed = True
        m, last = self.metrics, self.last
        reason = "cancelled" if last is None or last.finish_reason is None else last.finish_reason
        m.finished.inc(model=self.model, reason=reason)
        if last is None:
            return
        m.prompt_tokens.inc(last.prompt_tokens, model=self.model)
        m.generation_tokens.inc(last.completion_tokens, model=self.model)
        if reason != "cancelled" and self.first is not None and last.completion_tokens > 1:
            m.tpot.observe((time.perf_counter() - self.first) / (last.completion_tokens - 1), model=self.model)


def _check_common(n: int | None, stream_options, stream: bool | None) -> None:
    if n not in (None, 1):
        raise ApiError(
            400,
            f"n = {n} is not supported: this server returns one choice per request (n must be 1)",
            param="n",
        )
    if stream_options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")


def _message_dict(m: s.ChatMessage, i: int) -> dict:
    content = m.content
    if content is None:
        if m.role != "assistant":
            raise ApiError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
        content = ""
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"content part type {part.type!r} is not supported (only 'text' parts)",
                               param=f"messages[{i}].content[{j}].type")  # fmt: skip
            texts.append(part.text)
        content = "\n".join(texts)
    return {"role": "system" if m.role == "developer" else m.role, "content": content}


def _request_error(fn):
    try:
        return fn()
    except RequestError as e:
        raise ApiError(400, str(e), param=e.param) from None


def _generation_request(prompt: list[int], max_tokens: int, body, logprobs: int | None):
    from llmfn.engine import GenerationRequest

    top_k = body.top_k or 0
    sampling = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if top_k < 0 else top_k,
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
    )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    kwargs = {"logprobs": logprobs} if logprobs is not None else {}
    return GenerationRequest(
        prompt_ids=list(prompt), max_tokens=max_tokens, sampling=sampling, stop=stop, **kwargs
    )


def _engine_error(e: LlmfnError) -> ApiError:
    if type(e).__name__ == "QueueFullError":
        retry = str(getattr(e, "retry_after", 1)).encode()
        return ApiError(429, f"the server is busy: {e}", code="queue_full", headers=[(b"retry-after", retry)])
    if isinstance(e, RequestError):
        return ApiError(400, str(e), param=e.param)
    return ApiError(400, str(e))


def _event_error(ev) -> ApiError | None:
    if getattr(ev, "error", None) or ev.finish_reason in ("error", "cancelled"):
        what = "cancelled" if ev.finish_reason == "cancelled" else "failed"
        return ApiError(500 if what == "failed" else 503, f"generation {what}: {ev.error or ev.finish_reason}",
                        code="generation_" + what)  # fmt: skip
    return None


def _raise_event_error(ev) -> None:
    if (error := _event_error(ev)) is not None:
        raise error


def _finish(ev) -> str | None:
    return None if ev is None else ev.finish_reason


def _usage(ev) -> s.Usage:
    p, c = (ev.prompt_tokens, ev.completion_tokens) if ev is not None else (0, 0)
    return s.Usage(p, c, p + c)


def _sum_usage(events) -> s.Usage:
    p = sum(ev.prompt_tokens for ev in events if ev is not None)
    c = sum(ev.completion_tokens for ev in events if ev is not None)
    return s.Usage(p, c, p + c)


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def _chain(first, rest) -> AsyncIterator:
    """The first event, then the rest until a finish_reason; always closes the engine iterator."""
    try:
        yield first
        if first.finish_reason is None:
            async for ev in rest:
                yield ev
                if ev.finish_reason is not None:
                    break
    finally:
        await _aclose(rest)


async def _merge(streams: list) -> AsyncIterator[tuple[int, object]]:
    """(index, event) from several event streams as they arrive."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for ev in only:
                yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i, stream):
        try:
            async for ev in stream:
                await queue.put((i, ev))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await _aclose(stream)
            await queue.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is end:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _listed(value, param: str, limit: int) -> list:
    """A string, a token id list, a list of strings or a list of token id lists, as a list of items
    (at most `limit`); anything else is a 400 naming `param`."""
    if isinstance(value, str):
        items = [value]
    elif not value:
        raise ApiError(400, f"{param} is an empty list", param=param)
    elif all(isinstance(v, int) for v in value):
        items = [value]
    elif all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value):
        items = value
    else:
        raise ApiError(400, f"{param} must be a string, a list of strings, a list of token ids or a list of token id lists",
                       param=param)  # fmt: skip
    if len(items) > limit:
        raise ApiError(400, f"at most {limit} {param}s per request", param=param)
    return items


def _prompts(served: Served, prompt) -> list[list[int]]:
    """Token ids per prompt: a string, a list of strings, a token id list or a list of token id lists."""
    vocab = served.model.cfg.vocab_size
    items = _listed(prompt, "prompt", MAX_PROMPTS)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = served.model.tokenizer.encode_prompt(item)
        else:
            ids = list(item)
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(
                    400,
                    f"prompt token ids must be in [0, {vocab})",
                    param="prompt" if len(items) == 1 else f"prompt[{i}]",
                )
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt" if len(items) == 1 else f"prompt[{i}]")
        out.append(ids)
    return out


def _embedding_inputs(value, vocab: int):
    items = _listed(value, "input", MAX_EMBEDDING_INPUTS)
    for i, item in enumerate(items):
        if len(item) == 0:
            raise ApiError(400, f"input[{i}] is empty", param="input")
        if not isinstance(item, str) and any(not 0 <= t < vocab for t in item):
            raise ApiError(400, f"input[{i}]: token ids must be in [0, {vocab})", param="input")
    return value if isinstance(value, str) else items


def _embedding_dim(served: Served) -> int:
    cfg = served.model.cfg
    return int(getattr(cfg, "dim", getattr(cfg, "hidden_size", 0))) * len(
        served.model.extra.get("pooling", ("mean",))
    )


def _token_logprobs(served: Served, ev) -> list[s.TokenLogprob]:
    """OpenAI chat logprobs for the tokens of one event, from the engine's per-token data."""
    out = []
    for entry in getattr(ev, "logprobs", None) or []:
        token_id, logprob, tops = _logprob_entry(entry)
        top = [s.TopLogprob(*_token_text(served, t), lp) for t, lp in tops]
        text, raw = _token_text(served, token_id)
        out.append(s.TokenLogprob(text, raw, logprob, top))
    return out


def _token_text(served: Served, token_id: int) -> tuple[str, list[int]]:
    """(text, UTF-8 bytes) of one token; the bytes are exact even when the text is a partial character."""
    tok = served.model.tokenizer
    text = tok.decode([token_id])
    try:
        raw = bytes(tok.token_bytes(token_id))
    except Exception:
        raw = text.encode()
    return text, list(raw)


def _logprob_entry(entry) -> tuple[int, float, list[tuple[int, float]]]:
    """(token id, logprob, [(id, logprob), ...]) from the engine's entry (tuple, dict or object)."""
    if isinstance(entry, dict):
        return (
            entry["token_id"],
            float(entry["logprob"]),
            list(entry.get("top", entry.get("top_logprobs", []))),
        )
    if isinstance(entry, tuple):
        token_id, logprob, *rest = entry
        tops = rest[0] if rest else []
        return token_id, float(logprob), list(tops.items() if isinstance(tops, dict) else tops)
    tops = getattr(entry, "top", None) or getattr(entry, "top_logprobs", None) or []
    return entry.token_id, float(entry.logprob), list(tops.items() if isinstance(tops, dict) else tops)


class _CompletionLogprobs:
    """The legacy completions logprobs object, accumulated over events."""

    def __init__(self, served: Served):
        self.tok = served.model.tokenizer
        self.tokens, self.token_logprobs, self.top, self.offsets = [], [], [], []

    def add(self, ev, offset: int) -> None:
        for entry in getattr(ev, "logprobs", None) or []:
            token_id, logprob, tops = _logprob_entry(entry)
            text = self.tok.decode([token_id])
            self.tokens.append(text)
            self.token_logprobs.append(logprob)
            self.top.append({self.tok.decode([t]): lp for t, lp in tops})
            self.offsets.append(offset)
            offset += len(text)

    def result(self) -> s.CompletionLogprobs:
        return s.CompletionLogprobs(self.tokens, self.token_logprobs, self.top, self.offsets)
