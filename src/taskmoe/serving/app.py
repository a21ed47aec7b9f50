"""The OpenAI-compatible HTTP API: ``create_app(backend, limits, api_key) -> FastAPI``.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``,
``POST /v1/completions`` (both JSON or, with ``stream: true``, server-sent events in OpenAI's chunk
format ending with ``data: [DONE]``), ``GET /health`` and ``GET /metrics`` (Prometheus text).

Design choices:

- **Limits first.** A body over ``max_body_bytes`` is refused (413) by an ASGI middleware before
  it is parsed; field limits give 400 naming the field; a prompt over ``max_prompt_tokens`` after
  templating gives 413; a full queue gives 429 with ``Retry-After``; a request unanswered after
  ``generation_timeout_s`` gives 504 (or, mid-stream, an ``error`` event). Every error body is
  OpenAI's ``{"error": {"message", "type", "param", "code"}}``; schema violations are 422, a body
  that is not JSON is 400.
- **Nothing names a file.** Requests carry text and a model id matched exactly against
  ``backend.model_ids()``; unknown fields are rejected (:mod:`taskmoe.serving.schemas`).
- **Auth** is a Bearer token compared in constant time, required on ``/v1/*`` and ``/metrics``
  when ``api_key`` is set; ``/health`` stays open for load balancers.
- **Routing before batching.** Each prompt is tokenized and routed once, then its ``n`` choices
  go to the :class:`~taskmoe.serving.scheduler.Scheduler` as rows under that route.
- **Disconnects cancel.** A non-streaming request watches its connection while it waits; a
  streaming response cancels its rows when Starlette stops the stream.

FastAPI, pydantic and uvicorn are the optional ``[serve]`` extra; this module is only imported
by :func:`create_app`'s callers, and :func:`taskmoe.serving.require_serve_extra` explains a missing
install. (No ``from __future__ import annotations`` here: FastAPI must see the request models
built per server by :func:`~taskmoe.serving.schemas.request_models` as real annotations.)
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

from taskmoe.serving import require_serve_extra

require_serve_extra()

from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.openapi.utils import get_openapi  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from taskmoe import __version__  # noqa: E402
from taskmoe.errors import DataError, RequestError, TaskmoeError  # noqa: E402
from taskmoe.serving.backend import Backend, Route, SamplingParams  # noqa: E402
from taskmoe.serving.limits import Limits  # noqa: E402
from taskmoe.serving.metrics import ServerMetrics  # noqa: E402
from taskmoe.serving.scheduler import RowOutcome, Scheduler, Ticket  # noqa: E402
from taskmoe.serving.schemas import (  # noqa: E402
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceTrace,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    TaskmoeInfo,
    Usage,
    request_models,
)

log = logging.getLogger("taskmoe.serving")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "malformed request or a field over its limit",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "request body or prompt too large",
        422: "request does not match the schema",
        429: "queue full; retry after Retry-After seconds",
        500: "the model failed",
        504: "generation timed out",
    }.items()
}


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


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------ edge
class Edge:
    """ASGI middleware at the edge: the body limit (413 before parsing) and per-route counters.

    The body is read up to ``max_bytes`` (it is small by construction), then replayed to the app;
    later ``receive`` calls go to the server, so disconnect detection keeps working. Written as
    plain ASGI rather than ``@app.middleware("http")`` so streaming and disconnects pass through.
    """

    def __init__(self, app: Callable, max_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status = 500

        async def counted_send(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self._limited(scope, receive, counted_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.inc(route=route, status=str(status))
            if route.endswith("completions"):
                self.metrics.latency.observe(time.monotonic() - t0, route=route)

    async def _limited(self, scope: dict, receive: Callable, send: Callable) -> None:
        too_large = ApiError(413, f"request body exceeds the server limit of {self.max_bytes} bytes",
                             code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await too_large.response()(scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------------------ helpers
def _loc(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body was already read, so only disconnects remain)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _sse(obj: Any) -> bytes:
    data = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n".encode()


def create_app(backend: Backend, limits: Limits | None = None, api_key: str | None = None,
               *, metrics: ServerMetrics | None = None) -> FastAPI:
    """Build the ASGI app serving ``backend`` under ``limits``; ``api_key`` turns on Bearer auth."""
    limits = limits or Limits()
    metrics = metrics or ServerMetrics()
    scheduler = Scheduler(backend, limits, metrics)
    started = int(time.time())
    ChatRequest, TextRequest = request_models(limits)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.close()

    app = FastAPI(
        title="taskmoe", version=__version__, lifespan=lifespan,
        description="OpenAI-compatible API over a taskmoe model (expert-grouped batching).",
    )
    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the streamed chunk model the SSE responses refer to."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in chunk.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components["ChatCompletionChunk"] = chunk
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.limits = limits

    # ---------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json").response()
        if tuple(first.get("loc", ())) == ("body",):
            return ApiError(400, "request body must be a JSON object (send Content-Type: application/json)",
                            code="invalid_json").response()
        more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
        param = _loc(first.get("loc", ()))
        return ApiError(422, f"{param}: {first.get('msg')}{more}", param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), type=kind, headers=dict(e.headers or {})).response()

    @app.exception_handler(TaskmoeError)
    async def _bad_input(_req: Request, e: TaskmoeError) -> JSONResponse:
        if isinstance(e, (RequestError, DataError)):
            return ApiError(400, str(e)).response()
        log.error("%s: %s", type(e).__name__, e)
        return ApiError(500, f"{type(e).__name__}: {e}", type="server_error").response()

    @app.exception_handler(Exception)
    async def _crash(_req: Request, e: Exception) -> JSONResponse:
        log.error("unhandled %s: %s", type(e).__name__, e)
        return ApiError(500, f"internal server error ({type(e).__name__})", type="server_error").response()

    app.add_middleware(Edge, max_bytes=limits.max_body_bytes, metrics=metrics)

    # ------------------------------------------------------------------ auth
    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorize)]

    # -------------------------------------------------------------- validation
    def check_model(model: str) -> str:
        if model not in backend.model_ids():
            raise ApiError(404, f"model {model!r} does not exist; served: {backend.model_ids()}",
                           type="not_found_error", param="model", code="model_not_found")
        return model

    def sampling(req: ChatCompletionRequest | CompletionRequest) -> tuple[list[SamplingParams], list[str]]:
        """Per-choice sampling settings (field limits were enforced by the schema: 422)."""
        n = req.n or 1
        budget = req.token_budget()
        max_tokens = limits.default_max_tokens if budget is None else budget
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        seeds = [None] * n if req.seed is None else [(req.seed + i) % 2**63 for i in range(n)]
        return [SamplingParams(max_tokens, temperature, top_p, s) for s in seeds], req.stop_list()

    def check_length(ids: list[int], param: str) -> list[int]:
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(413, f"prompt has {len(ids)} tokens; the server limit is {limits.max_prompt_tokens}",
                           param=param, code="context_length_exceeded")
        return ids

    def reserve(rows: int) -> None:
        if scheduler.waiting_rows + rows > limits.queue_size:
            metrics.rejected.inc()
            raise ApiError(429, f"server busy: queue full ({scheduler.waiting_rows}/{limits.queue_size} rows); retry later",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(limits.retry_after_s)})

    async def admit(model: str, prompts: list[list[int]], params: list[SamplingParams], stop: list[str],
                    stream: bool) -> list[list[Ticket]]:
        """Route each prompt (off the event loop), then queue its rows; all prompts or none."""
        reserve(len(prompts) * len(params))
        routes: list[Route] = [await asyncio.to_thread(backend.route, model, ids) for ids in prompts]
        reserve(len(prompts) * len(params))  # routing awaited: re-check; no await from here to the submits
        out = [scheduler.submit(route, [(ids, p) for p in params], stop, stream=stream)
               for ids, route in zip(prompts, routes)]
        for ids in prompts:
            metrics.prompt_tokens.inc(len(ids))
        return out

    async def wait_rows(tickets: list[Ticket], request: Request) -> list[RowOutcome] | None:
        """All outcomes, or None if the client went away; 504 on timeout, 500 if the backend failed."""
        results = asyncio.ensure_future(asyncio.gather(*(t.result() for t in tickets)))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({results, gone}, timeout=limits.generation_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if results in done:
            try:
                outcomes = results.result()
            except Exception as e:  # noqa: BLE001 - the backend raised; the batch failed
                raise ApiError(500, f"generation failed: {type(e).__name__}", type="server_error") from e
            if any(o.finish == "timeout" for o in outcomes):
                raise ApiError(504, f"generation exceeded {limits.generation_timeout_s} s", type="timeout_error",
                               code="timeout")
            return outcomes
        results.cancel()
        for t in tickets:
            t.cancel(timeout=gone not in done)
        if gone in done:
            return None
        raise ApiError(504, f"generation exceeded {limits.generation_timeout_s} s", type="timeout_error", code="timeout")

    def trace_info(tickets: list[Ticket], outcomes: list[RowOutcome | None]) -> TaskmoeInfo:
        return TaskmoeInfo(choices=[
            ChoiceTrace(index=i, route=dict(t.route.trace), generation=dict(o.trace) if o and o.trace else None)
            for i, (t, o) in enumerate(zip(tickets, outcomes))
        ])

    def usage(prompts: list[list[int]], outcomes: list[RowOutcome]) -> Usage:
        p = sum(len(ids) for ids in prompts)
        c = sum(len(o.token_ids) for o in outcomes)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    async def stream_rows(tickets: list[Ticket], request: Request, first: Callable[[int], Any],
                          piece: Callable[[int, str], Any], last: Callable[[int, str], Any],
                          final: Callable[[list[RowOutcome]], list[Any]]) -> AsyncIterator[bytes]:
        """SSE bytes for rows streamed together; cancels every row if the stream stops early."""
        events: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

        async def pump(i: int, t: Ticket) -> None:
            async for d in t.deltas():
                events.put_nowait((i, d))
            events.put_nowait((i, None))

        pumps = [asyncio.ensure_future(pump(i, t)) for i, t in enumerate(tickets)]
        gone = asyncio.ensure_future(_client_gone(request))
        deadline = time.monotonic() + limits.generation_timeout_s
        get: asyncio.Future | None = None
        try:
            for i in range(len(tickets)):
                if first(i) is not None:
                    yield _sse(first(i))
            open_rows = len(tickets)
            while open_rows:
                remaining = deadline - time.monotonic()
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, gone}, timeout=max(remaining, 0.0), return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if gone in done:
                        return
                    for t in tickets:
                        t.cancel(timeout=True)
                    yield _sse(ApiError(504, f"generation exceeded {limits.generation_timeout_s} s",
                                        type="timeout_error", code="timeout").body())
                    yield b"data: [DONE]\n\n"
                    return
                i, d = get.result()
                if d is not None:
                    yield _sse(piece(i, d))
                    continue
                open_rows -= 1
            try:
                outcomes = [await t.result() for t in tickets]
            except Exception as e:  # noqa: BLE001 - the backend raised; say so in-stream
                yield _sse(ApiError(500, f"generation failed: {type(e).__name__}", type="server_error").body())
                yield b"data: [DONE]\n\n"
                return
            if any(o.finish == "timeout" for o in outcomes):
                yield _sse(ApiError(504, f"generation exceeded {limits.generation_timeout_s} s",
                                    type="timeout_error", code="timeout").body())
            else:
                for i, o in enumerate(outcomes):
                    yield _sse(last(i, o.finish))
                for extra in final(outcomes):
                    yield _sse(extra)
            yield b"data: [DONE]\n\n"
        finally:
            gone.cancel()
            if get is not None:
                get.cancel()
            for p in pumps:
                p.cancel()
            for t in tickets:
                t.cancel()

    # ---------------------------------------------------------------- routes
    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        return Health(models=backend.model_ids(), queue_rows=scheduler.waiting_rows, running_rows=scheduler.running_rows)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=auth, tags=["server"],
             responses={401: ERROR_RESPONSES[401]})
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, tags=["openai"],
             responses={401: ERROR_RESPONSES[401]})
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=m, created=started) for m in backend.model_ids()])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, dependencies=auth, tags=["openai"],
             responses={k: ERROR_RESPONSES[k] for k in (401, 404, 422)})
    async def get_model(model_id: str) -> ModelCard:
        return ModelCard(id=check_model(model_id), created=started)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, response_model_exclude_none=True,
              dependencies=auth, tags=["openai"], responses={**sse_200("ChatCompletionChunk"), **ERROR_RESPONSES})
    async def chat_completions(req: ChatRequest, request: Request) -> Any:  # type: ignore[valid-type]
        model = check_model(req.model)
        params, stop = sampling(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        ids = check_length(await asyncio.to_thread(backend.encode_chat, messages), "messages")
        (tickets,) = await admit(model, [ids], params, stop, bool(req.stream))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=cid, created=created, model=model,
                                       choices=[ChunkChoice(index=i, delta=delta, finish_reason=finish)])

        if req.stream:
            def final(outcomes: list[RowOutcome]) -> list[Any]:
                out = []
                if req.wants_trace:
                    out.append(ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                                   taskmoe=trace_info(tickets, outcomes)))
                if req.wants_usage_chunk:
                    out.append(ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                                   usage=usage([ids], outcomes)))
                return out

            return StreamingResponse(
                stream_rows(tickets, request,
                            first=lambda i: chunk(i, Delta(role="assistant", content="")),
                            piece=lambda i, d: chunk(i, Delta(content=d)),
                            last=lambda i, f: chunk(i, Delta(), f),
                            final=final),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        outcomes = await wait_rows(tickets, request)
        if outcomes is None:
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        return ChatCompletion(
            id=cid, created=created, model=model,
            choices=[ChatChoice(index=i, message=AssistantMessage(content=o.text), finish_reason=o.finish)
                     for i, o in enumerate(outcomes)],
            usage=usage([ids], outcomes),
            taskmoe=trace_info(tickets, outcomes) if req.wants_trace else None,
        )

    @app.post("/v1/completions", response_model=Completion, response_model_exclude_none=True,
              dependencies=auth, tags=["openai"], responses={**sse_200("Completion"), **ERROR_RESPONSES})
    async def completions(req: TextRequest, request: Request) -> Any:  # type: ignore[valid-type]
        model = check_model(req.model)
        texts = req.prompts()
        params, stop = sampling(req)
        prompts = [check_length(await asyncio.to_thread(backend.encode_prompt, t), "prompt") for t in texts]
        tickets = [t for group in await admit(model, prompts, params, stop, bool(req.stream)) for t in group]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, text: str, finish: str | None = None) -> Completion:
            return Completion(id=cid, created=created, model=model,
                              choices=[CompletionChoice(index=i, text=text, finish_reason=finish)])

        if req.stream:
            def final(outcomes: list[RowOutcome]) -> list[Any]:
                out = []
                if req.wants_trace:
                    out.append(Completion(id=cid, created=created, model=model, choices=[],
                                          taskmoe=trace_info(tickets, outcomes)))
                if req.wants_usage_chunk:
                    out.append(Completion(id=cid, created=created, model=model, choices=[],
                                          usage=usage(prompts, outcomes)))
                return out

            return StreamingResponse(
                stream_rows(tickets, request, first=lambda i: None, piece=lambda i, d: chunk(i, d),
                            last=lambda i, f: chunk(i, "", f), final=final),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        outcomes = await wait_rows(tickets, request)
        if outcomes is None:
            return JSONResponse({}, status_code=499)
        return Completion(
            id=cid, created=created, model=model,
            choices=[CompletionChoice(index=i, text=o.text, finish_reason=o.finish) for i, o in enumerate(outcomes)],
            usage=usage(prompts, outcomes),
            taskmoe=trace_info(tickets, outcomes) if req.wants_trace else None,
        )

    return app
