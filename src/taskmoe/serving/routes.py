"""The HTTP routes: ``/health``, ``/metrics``, ``/v1/models[/{id}]`` and the two completion endpoints.

Routes only bind HTTP to the parts that do the work: both completion endpoints call the one
:class:`~taskmoe.serving.completion.CompletionHandler`; ``/health`` reports the scheduler's state
and any failed component (``degraded``); ``/metrics`` is ``prometheus_client``'s exposition.
Authentication is middleware (:mod:`taskmoe.serving.auth`), so no route can forget it.

(No ``from __future__ import annotations``: FastAPI must see the request models built per server
by :func:`~taskmoe.serving.schemas.request_models` as real annotations.)
"""

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from taskmoe.serving.completion import ChatEndpoint, CompletionHandler, TextEndpoint
from taskmoe.serving.errors import ERROR_RESPONSES
from taskmoe.serving.metrics import CONTENT_TYPE
from taskmoe.serving.schemas import ChatCompletion, Completion, ComponentStatus, Health, ModelCard, ModelList

__all__ = ["add_routes", "sse_200"]

AUTH = {401: ERROR_RESPONSES[401]}


def sse_200(chunk_model: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a 200 that is JSON, or with ``stream: true`` server-sent events: each event's
    ``data`` is a JSON chunk (or an error object) and the last one is ``[DONE]``."""
    data = {"anyOf": [
        {"const": "[DONE]"},
        {"contentMediaType": "application/json",
         "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk_model}"},
                                     {"$ref": "#/components/schemas/ErrorResponse"}]}},
    ]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"description": "JSON, or server-sent events with stream=true",
                  "content": {"text/event-stream": {"schema": event}}}}


def add_routes(app: FastAPI, handler: CompletionHandler, ChatRequest: type, TextRequest: type,
               *, completions: bool = True) -> None:
    """Register every route of the API on ``app``; the request models carry the server's limits.
    ``completions=False`` (``serve --route-only``) leaves out the two completion endpoints."""
    backend, scheduler, metrics = handler.backend, handler.scheduler, handler.metrics
    started = int(time.time())
    chat, text = ChatEndpoint(), TextEndpoint()

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        failed = [ComponentStatus(component=c, error=e) for c, e in sorted(scheduler.failed.items())]
        return Health(status="degraded" if failed else "ok", models=backend.model_ids(),
                      queue_rows=scheduler.waiting_rows, running_rows=scheduler.running_rows,
                      backlog_tokens=scheduler.backlog, work_tokens_per_s=scheduler.admission.rate, failed=failed)

    @app.get("/metrics", response_class=Response, tags=["server"], responses=AUTH)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"], responses=AUTH)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=m, created=started) for m in backend.model_ids()])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, tags=["openai"],
             responses={k: ERROR_RESPONSES[k] for k in (401, 404, 422)})
    async def get_model(model_id: str) -> ModelCard:
        return ModelCard(id=handler.check_model(model_id), created=started)

    if not completions:
        return

    @app.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True, tags=["openai"],
              responses={**sse_200("ChatCompletionChunk"), **ERROR_RESPONSES})
    async def chat_completions(req: ChatRequest, request: Request) -> Any:  # type: ignore[valid-type]
        return await handler(chat, req, request)

    @app.post("/v1/completions", response_model=Completion, response_model_exclude_none=True, tags=["openai"],
              responses={**sse_200("Completion"), **ERROR_RESPONSES})
    async def completions(req: TextRequest, request: Request) -> Any:  # type: ignore[valid-type]
        return await handler(text, req, request)
