"""The routes around the API: the model list, health, Prometheus metrics, the OpenAPI document and
its page, and the static web chat."""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from pathlib import Path

from llmfn.serve import schemas as s
from llmfn.serve.http import ApiError, Request, Response
from llmfn.serve.metrics import Metrics
from llmfn.serve.models import ModelPool, Served
from llmfn.serve.openapi import DOCS_HTML

STATIC = Path(__file__).parent / "static"


async def list_models(pool: ModelPool, req: Request):
    pool.ready()
    cards = [_card(name, served) for name, served in pool.served.items()]
    return Response.json(s.ModelList(cards))


async def get_model(pool: ModelPool, req: Request):
    name = req.path_params["model"]
    served = pool.get(name)
    return Response.json(_card(name, served))


def _card(name: str, served: Served) -> s.ModelCard:
    return s.ModelCard(
        name, served.created, root=served.name, type=served.kind, max_model_len=served.context_length
    )


async def health(pool: ModelPool, req: Request):
    if pool.status == "ok":
        return Response.json(s.Health("ok", [x.name for x in pool.order]))
    return Response.json(s.Health(pool.status, error=pool.error), 503, [(b"retry-after", b"2")])


async def prometheus(metrics: Metrics, req: Request):
    return Response.text(metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")


async def openapi_json(document: Callable[[], bytes], req: Request):
    return Response(200, document(), [(b"content-type", b"application/json")])


async def docs(req: Request):
    return Response.text(DOCS_HTML, b"text/html; charset=utf-8")


async def index(req: Request):
    page = STATIC / "index.html"
    if page.is_file():
        return Response(200, page.read_bytes(), [(b"content-type", b"text/html; charset=utf-8")])
    return Response.text('<!doctype html><title>llmfn</title><p>llmfn is running: see <a href="/docs">/docs</a>, '
                         '<a href="/v1/models">/v1/models</a> and <a href="/health">/health</a>.</p>',
                         b"text/html; charset=utf-8")  # fmt: skip


async def static(req: Request):
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
