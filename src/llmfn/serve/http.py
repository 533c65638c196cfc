"""The few ASGI pieces the app needs, without a framework: requests with a bounded body, responses,
OpenAI-shaped errors, a router, and the bearer-auth and CORS middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from llmfn.serve.schemas import ErrorDetail, ErrorResponse, encoder

log = logging.getLogger("llmfn.serve")

JSON = b"application/json"
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}  # fmt: skip
CLOSE = [(b"connection", b"close")]


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or []

    def body(self) -> ErrorResponse:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return ErrorResponse(ErrorDetail(self.message, kind, self.param, self.code))

    def response(self) -> Response:
        return Response.json(self.body(), self.status, self.headers)


@dataclass
class Request:
    scope: dict
    body: bytes = b""
    path_params: dict[str, str] = field(default_factory=dict)
    cleanup: list = field(default_factory=list)  # engine iterators the server closes when the request ends

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.scope.get("headers", ()) if k.lower() == name), None)

    def decode(self, type_):
        """The JSON body as `type_`; malformed JSON or a wrong field is a 400 naming the param."""
        if not self.body.strip():
            raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
        try:
            try:
                return msgspec.json.decode(self.body, type=type_)
            except msgspec.ValidationError as e:
                if "got `float`" not in str(e):
                    raise
            # JSON (and JSON Schema) has no int/float distinction: 3.0 is an integer
            return msgspec.convert(_integral(msgspec.json.decode(self.body)), type_)
        except msgspec.ValidationError as e:
            raise validation_error(str(e)) from None
        except msgspec.DecodeError as e:
            raise ApiError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None
        except RecursionError:
            raise too_deep() from None


def _integral(value):
    """`value` with every float that holds an integer (3.0, 1e3) made an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def too_deep() -> ApiError:
    return ApiError(400, "the request body nests too deeply", code="invalid_json")


def validation_error(message: str) -> ApiError:
    """msgspec's 'Expected `float` <= 2.0 - at `$.temperature`' as a 400 with param 'temperature'."""
    text, sep, where = message.rpartition(" - at ")
    if not sep:
        text, where = message, ""
    # a dict's value is `$.logit_bias[...]`: the param is the dict
    param = where.strip("`").removeprefix("$.").removeprefix("$").replace("[...]", "") or None
    missing = re.search(r"missing required field `([^`]+)`", text)
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
        return ApiError(
            400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter"
        )
    if param is None:
        return ApiError(400, f"invalid request body: {text}", code="invalid_type")
    return ApiError(400, f"invalid value for '{param}': {text}", param=param, code="invalid_value")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def json(cls, obj, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
        return cls(status, encoder.encode(obj), [(b"content-type", JSON), *(headers or [])])

    @classmethod
    def text(
        cls, text: str, content_type: bytes = b"text/plain; charset=utf-8", status: int = 200
    ) -> Response:
        return cls(status, text.encode(), [(b"content-type", content_type)])

    async def send(self, send, *, head: bool = False) -> None:
        headers = [*self.headers, (b"content-length", str(len(self.body)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


@dataclass
class StreamingResponse:
    """Server-sent events: `chunks` yields encoded `data: ...\\n\\n` frames. Closing it (on a client
    disconnect) runs its finally blocks, which cancel the generation."""

    chunks: AsyncIterator[bytes]
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(
        default_factory=lambda: [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                 (b"x-accel-buffering", b"no")])  # fmt: skip

    async def send(self, send, *, keepalive: float | None = None, stop: asyncio.Future | None = None) -> None:
        """Send the events as they come, with a keep-alive comment after each `keepalive` seconds of
        silence; once `stop` completes (the server shuts down), end with an error event and [DONE]."""
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        async with contextlib.aclosing(self.chunks) as chunks:
            async for chunk in paced(chunks, keepalive, stop):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


SSE_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see a live connection


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", code="server_shutting_down", headers=CLOSE)


async def paced(chunks: AsyncIterator[bytes], keepalive: float | None, stop: asyncio.Future | None) -> AsyncIterator[bytes]:
    """`chunks`, with SSE_KEEPALIVE after every `keepalive` seconds without one (a request waiting for
    an engine slot, a slow step), cut short by an error event and [DONE] when `stop` completes."""
    stopped, pending = stop, None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({pending, stopped} - {None}, timeout=keepalive,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if pending in done:
                task, pending = pending, None
                try:
                    yield task.result()
                except StopAsyncIteration:
                    return
            elif done:  # stop: the server shuts down
                yield sse(shutting_down().body())
                yield SSE_DONE
                return
            else:
                yield SSE_KEEPALIVE
    finally:
        for task in (pending, stopped):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task})  # the generation closes what it holds


def sse(obj, event: str | None = None) -> bytes:
    """One server-sent event: `data: <json>`, after an `event:` line when named (Responses API)."""
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + encoder.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]


class Router:
    """Exact paths, plus prefixes ending in '/{name}' for one trailing path parameter."""

    def __init__(self) -> None:
        self.exact: dict[str, dict[str, Handler]] = {}
        self.prefix: list[tuple[str, str, dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        if path.endswith("}"):
            base, _, name = path.rpartition("/{")
            for p, n, methods in self.prefix:
                if p == base + "/" and n == name[:-1]:
                    methods[method] = handler
                    return
            self.prefix.append((base + "/", name[:-1], {method: handler}))
        else:
            self.exact.setdefault(path, {})[method] = handler

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str], str]:
        """(handler, path parameters, route pattern); ApiError 404 or 405 when none fits."""
        methods, params, pattern = self.exact.get(path), {}, path
        if methods is None:
            for base, name, m in self.prefix:
                if path.startswith(base) and len(path) > len(base):
                    methods, params, pattern = m, {name: path[len(base) :]}, f"{base}{{{name}}}"
                    break
        if methods is None:
            raise ApiError(404, f"no route for {method} {path}", code="not_found")
        if method == "HEAD" and "GET" in methods:
            method = "GET"
        if method not in methods:
            allow = ", ".join(sorted(methods)).encode()
            raise ApiError(405, f"method {method} is not allowed for {path} (allowed: {allow.decode()})",
                           code="method_not_allowed", headers=[(b"allow", allow)])  # fmt: skip
        return methods[method], params, pattern


async def read_body(receive, limit: int, declared: bytes | None, timeout: float) -> bytes:
    """The whole request body, refusing (413) as soon as it passes `limit` bytes, and (408, closing
    the connection) when it has not all come within `timeout` seconds: a client that stalls mid-body
    holds no connection for longer."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
    try:
        async with asyncio.timeout(timeout):
            return await _read(receive, limit)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g}s", code="request_timeout",
                       headers=CLOSE) from None  # fmt: skip


async def _read(receive, limit: int) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")  # fmt: skip


def release_frames(exc: BaseException | None) -> None:
    """Clear the locals of the finished frames in exc's traceback and its context's. An error raised
    before the body was read (408, 413) leaves the ASGI `receive` in those frames, in reference cycles
    (a task holds the error, whose traceback holds the frame that holds the task); until the cyclic GC
    freed them Granian kept the connection open, so a client stalled mid-body kept its socket after
    its 408."""
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__


class ClientGone(Exception):
    """The client disconnected before the response."""


async def wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive, work: Awaitable):
    """Run `work`; if the client disconnects first, cancel it (closing any generation it holds) and
    raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it close what it holds; its outcome is not ours to raise
    if task.cancelled():
        raise ClientGone
    return task.result()


# ---------------------------------------------------------------------------------------------- middleware


class BearerAuth:
    """Pure-ASGI bearer-token check for paths under `protected` prefixes; keys are compared with
    hmac.compare_digest against every configured key (no early exit on a match)."""

    def __init__(
        self, app, keys: list[str], protected: tuple[str, ...] = ("/v1/", "/tokenize", "/detokenize")
    ):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.protected = protected

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] == "http"
            and scope["method"] != "OPTIONS"
            and scope["path"].startswith(self.protected)
        ):
            if not self.allowed(scope):
                error = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])  # fmt: skip
                await error.response().send(send)
                return
        await self.app(scope, receive, send)

    def allowed(self, scope) -> bool:
        value = next((v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        token = token.strip()
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(token, key)
        return ok


class Cors:
    """Answers preflight requests and adds Access-Control-Allow-Origin for the configured origins
    ("*" allows any)."""

    def __init__(self, app, origins: list[str]):
        self.app = app
        self.any = "*" in origins
        self.origins = {o.rstrip("/").encode() for o in origins}

    async def __call__(self, scope, receive, send):
        origin = (
            next((v for k, v in scope.get("headers", ()) if k.lower() == b"origin"), None)
            if scope["type"] == "http"
            else None
        )
        if origin is None or not (self.any or origin.rstrip(b"/") in self.origins):
            await self.app(scope, receive, send)
            return
        allow = [(b"access-control-allow-origin", b"*" if self.any else origin), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and any(
            k.lower() == b"access-control-request-method" for k, _ in scope["headers"]
        ):
            headers = [*allow, (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                       (b"access-control-allow-headers", b"Authorization, Content-Type"),
                       (b"access-control-max-age", b"600"), (b"content-length", b"0")]  # fmt: skip
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *allow]}
            await send(message)

        await self.app(scope, receive, send_with_cors)
