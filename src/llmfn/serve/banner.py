"""The lines the server logs once its models are ready: what it serves and where to point a browser
or an OpenAI client. `run` puts the address it binds in the environment (URL_ENV) for its workers."""

from __future__ import annotations

import os

URL_ENV = "LLMFN_SERVE_URL"  # e.g. http://127.0.0.1:8000, set by llmfn.serve.run for the workers


def base_url(host: str, port: int) -> str:
    """The URL a local client uses: a wildcard bind is reached at localhost; IPv6 goes in brackets."""
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def ready_banner(models: list[tuple[str, str]], url: str | None = None) -> str:
    """`models`: (name, kind) of each served model. The URLs come from URL_ENV when url is None;
    without either (an app started by hand under Granian) the banner names the paths only."""
    url = (url or os.environ.get(URL_ENV) or "").rstrip("/")
    served = ", ".join(f"{name} ({kind})" for name, kind in models) or "no models"
    return "\n".join([
        f"ready: {served}",
        f"  web chat      {url}/",
        f"  API docs      {url}/docs",
        f"  OpenAI API    {url}/v1   (OPENAI_BASE_URL={url}/v1)" if url else "  OpenAI API    /v1",
    ])  # fmt: skip
