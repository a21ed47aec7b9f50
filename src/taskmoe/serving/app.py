"""The OpenAI-compatible HTTP API: ``create_app(backend, limits, api_key) -> FastAPI``.

``create_app`` only assembles the parts, each in its own module with one job:

- :mod:`~taskmoe.serving.edge` (body size and read-time limits, request metrics) and
  :mod:`~taskmoe.serving.auth` (Bearer key on every path but ``/health``): ASGI middleware;
- :mod:`~taskmoe.serving.errors`: OpenAI-style error JSON for every exception;
- :mod:`~taskmoe.serving.routes` -> :mod:`~taskmoe.serving.completion` (one handler behind both
  completion endpoints) -> :mod:`~taskmoe.serving.streaming` (SSE, waiting with disconnect watch);
  :mod:`~taskmoe.serving.route_api` (``/v1/route``: the routing decision alone, for a multi-LoRA engine);
- :mod:`~taskmoe.serving.scheduler` (continuous batching, admission by work, cancellation), started
  and stopped with the app's lifespan.

FastAPI, pydantic and uvicorn are the optional ``[serve]`` extra; this module is only imported
by :func:`create_app`'s callers, and :func:`taskmoe.serving.require_serve_extra` explains a missing
install.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from taskmoe.serving import require_serve_extra

require_serve_extra()

from fastapi import FastAPI  # noqa: E402
from fastapi.openapi.utils import get_openapi  # noqa: E402

from taskmoe import __version__  # noqa: E402
from taskmoe.errors import ConfigError  # noqa: E402
from taskmoe.serving.auth import BearerAuth  # noqa: E402
from taskmoe.serving.backend import Backend  # noqa: E402
from taskmoe.serving.completion import CompletionHandler  # noqa: E402
from taskmoe.serving.edge import Edge  # noqa: E402
from taskmoe.serving.errors import install_error_handlers  # noqa: E402
from taskmoe.serving.limits import Limits  # noqa: E402
from taskmoe.serving.metrics import ServerMetrics  # noqa: E402
from taskmoe.serving.route_api import add_route_endpoint  # noqa: E402
from taskmoe.serving.routes import add_routes  # noqa: E402
from taskmoe.serving.scheduler import Scheduler  # noqa: E402
from taskmoe.serving.schemas import ChatCompletionChunk, request_models  # noqa: E402

__all__ = ["create_app"]


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the streamed chunk model the SSE responses refer to."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in chunk.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components["ChatCompletionChunk"] = chunk
        if app.state.api_key:
            components_root = spec["components"]
            components_root["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            spec["security"] = [{"bearer": []}]
            spec["paths"]["/health"]["get"]["security"] = []
        app.openapi_schema = spec
    return app.openapi_schema


def create_app(backend: Backend, limits: Limits | None = None, api_key: str | None = None,
               *, metrics: ServerMetrics | None = None, route_only: bool = False) -> FastAPI:
    """Build the ASGI app serving ``backend`` under ``limits``; ``api_key`` puts every path but
    ``/health`` behind ``Authorization: Bearer <key>``. ``route_only``: answer ``/v1/route`` (and
    ``/health``, ``/metrics``, ``/v1/models``) but generate nothing, for a front end of a multi-LoRA
    engine; ConfigError when ``backend`` does not route with a router."""
    limits = limits or Limits()
    metrics = metrics or ServerMetrics()
    scheduler = Scheduler(backend, limits, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.close()

    app = FastAPI(title="taskmoe", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over a taskmoe model (continuous expert-grouped batching).")
    app.state.scheduler, app.state.metrics, app.state.limits, app.state.api_key = scheduler, metrics, limits, api_key
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    add_routes(app, CompletionHandler(backend, scheduler, limits, metrics),
               *request_models(limits, media=hasattr(backend, "encode_chat_media")), completions=not route_only)
    routes = add_route_endpoint(app, backend)  # POST /v1/route for systems that route with a router
    if route_only and not routes:
        raise ConfigError(f"--route-only needs a system that routes with a router (an IMoE run or a backbone "
                          f"system); {', '.join(backend.model_ids())} has none")
    app.add_middleware(Edge, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s, metrics=metrics)
    if api_key:  # outermost: a request without the key is refused before its body is read
        app.add_middleware(BearerAuth, api_key=api_key)
    return app
