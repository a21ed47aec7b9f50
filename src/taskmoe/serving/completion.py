"""ONE completion handler behind ``/v1/chat/completions`` and ``/v1/completions``.

The request flow is the same for both endpoints; only how prompts are made and how results are
shaped differ, and that is an :class:`Endpoint` (:class:`ChatEndpoint`, :class:`TextEndpoint`):

1. the model id is matched exactly against ``backend.model_ids()`` (404);
2. per-choice sampling settings (schema limits were enforced already: 422);
3. the prompts are tokenized off the event loop; text the tokenizer cannot take is a 400 naming
   the field; a prompt over ``max_prompt_tokens`` is a 413;
4. **admission before routing** (work estimate and queue, 429 early), routing once per prompt
   (off the loop), then admission again with the routes (a failed component they need: 503) and,
   with no ``await`` in between, every row is queued: all rows of a request or none;
5. the rows are streamed as SSE, or awaited while the connection is watched.

A row that failed answers 503 naming the component, or 500 for anything else (logged once); a
deadline answers 504 with one log line per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from taskmoe.errors import RequestError
from taskmoe.serving.backend import Backend, SamplingParams
from taskmoe.serving.errors import ApiError
from taskmoe.serving.limits import Limits
from taskmoe.serving.media import MediaError
from taskmoe.serving.metrics import ServerMetrics
from taskmoe.serving.scheduler import Scheduler
from taskmoe.serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceTrace,
    ChunkChoice,
    Completion,
    CompletionChoice,
    Delta,
    TaskmoeInfo,
    Usage,
)
from taskmoe.serving.streaming import event_stream, failure, wait_rows
from taskmoe.serving.tickets import RowOutcome, Ticket

log = logging.getLogger("taskmoe.serving")

__all__ = ["CompletionHandler", "ChatEndpoint", "TextEndpoint"]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Call:
    """One request in flight: what the endpoint needs to shape chunks and the response."""

    id: str
    created: int
    model: str
    req: Any
    prompts: list[list[int]]
    tickets: list[Ticket]

    def trace(self, outcomes: Sequence[RowOutcome | None]) -> TaskmoeInfo:
        return TaskmoeInfo(choices=[
            ChoiceTrace(index=i, route=dict(t.route.trace), generation=dict(o.trace) if o and o.trace else None)
            for i, (t, o) in enumerate(zip(self.tickets, outcomes))])

    def usage(self, outcomes: Sequence[RowOutcome]) -> Usage:
        p = sum(len(ids) for ids in self.prompts)
        c = sum(len(o.token_ids) for o in outcomes)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


class _Endpoint:
    """What differs between the endpoints; pieces, finish and summary chunks are built from ``chunk``."""

    prefix = param = ""

    def content(self, text: str) -> Any:
        raise NotImplementedError

    def chunk(self, c: _Call, i: int, content: Any, finish: str | None = None, **extra: Any) -> Any:
        raise NotImplementedError

    def first(self, c: _Call, i: int) -> Any:
        return None

    def piece(self, c: _Call, i: int, text: str) -> Any:
        return self.chunk(c, i, self.content(text))

    def last(self, c: _Call, i: int, finish: str) -> Any:
        return self.chunk(c, i, self.content(""), finish)

    def summary(self, c: _Call, **extra: Any) -> Any:
        return self.chunk(c, -1, self.content(""), **extra)


class ChatEndpoint(_Endpoint):
    """``/v1/chat/completions``: one templated prompt; chunks are deltas."""

    prefix, param = "chatcmpl", "messages"

    def texts(self, req: Any) -> list[Any]:
        return [[{"role": "system" if m.role == "developer" else m.role,
                  "content": [p.model_dump() for p in m.content] if m.has_media() else m.text()} for m in req.messages]]

    def encode(self, backend: Backend, messages: Any) -> list[int]:
        if any(not isinstance(m["content"], str) for m in messages):  # image/audio parts (taskmoe.serving.media)
            encode_media = getattr(backend, "encode_chat_media", None)
            if encode_media is None:
                raise ApiError(400, "this model does not accept image or audio content", param=self.param,
                               code="unsupported_content")
            try:
                return encode_media(messages)
            except MediaError as e:
                raise ApiError(e.status, str(e), param=self.param, code="invalid_media") from e
        return backend.encode_chat(messages)

    def content(self, text: str) -> Delta:
        return Delta(content=text) if text else Delta()

    def chunk(self, c: _Call, i: int, content: Any, finish: str | None = None, **extra: Any) -> ChatCompletionChunk:
        choices = [] if i < 0 else [ChunkChoice(index=i, delta=content, finish_reason=finish)]
        return ChatCompletionChunk(id=c.id, created=c.created, model=c.model, choices=choices, **extra)

    def first(self, c: _Call, i: int) -> Any:
        return self.chunk(c, i, Delta(role="assistant", content=""))

    def response(self, c: _Call, outcomes: list[RowOutcome], **extra: Any) -> ChatCompletion:
        return ChatCompletion(id=c.id, created=c.created, model=c.model, choices=[
            ChatChoice(index=i, message=AssistantMessage(content=o.text), finish_reason=o.finish)
            for i, o in enumerate(outcomes)], **extra)


class TextEndpoint(_Endpoint):
    """``/v1/completions``: one or more prompts (``n`` choices each); chunks carry text."""

    prefix, param = "cmpl", "prompt"

    def texts(self, req: Any) -> list[Any]:
        return req.prompts()

    def encode(self, backend: Backend, text: Any) -> list[int]:
        return backend.encode_prompt(text)

    def content(self, text: str) -> str:
        return text

    def chunk(self, c: _Call, i: int, content: Any, finish: str | None = None, **extra: Any) -> Completion:
        choices = [] if i < 0 else [CompletionChoice(index=i, text=content, finish_reason=finish)]
        return Completion(id=c.id, created=c.created, model=c.model, choices=choices, **extra)

    def response(self, c: _Call, outcomes: list[RowOutcome], **extra: Any) -> Completion:
        return Completion(id=c.id, created=c.created, model=c.model, choices=[
            CompletionChoice(index=i, text=o.text, finish_reason=o.finish) for i, o in enumerate(outcomes)], **extra)


class _StreamChunks:
    """An endpoint bound to one call: the :class:`~taskmoe.serving.streaming.Chunks` of its stream."""

    def __init__(self, endpoint: Any, call: _Call) -> None:
        self.e, self.c = endpoint, call

    def first(self, i: int) -> Any:
        return self.e.first(self.c, i)

    def piece(self, i: int, text: str) -> Any:
        return self.e.piece(self.c, i, text)

    def last(self, i: int, finish: str) -> Any:
        return self.e.last(self.c, i, finish)

    def final(self, outcomes: list[RowOutcome]) -> list[Any]:
        out = []
        if self.c.req.wants_trace:
            out.append(self.e.summary(self.c, taskmoe=self.c.trace(outcomes)))
        if self.c.req.wants_usage_chunk:
            out.append(self.e.summary(self.c, usage=self.c.usage(outcomes)))
        return out


class CompletionHandler:
    """The request flow of both endpoints (see the module docstring)."""

    def __init__(self, backend: Backend, scheduler: Scheduler, limits: Limits, metrics: ServerMetrics) -> None:
        self.backend, self.scheduler, self.limits, self.metrics = backend, scheduler, limits, metrics

    def check_model(self, model: str) -> str:
        if model not in self.backend.model_ids():
            raise ApiError(404, f"model {model!r} does not exist; served: {self.backend.model_ids()}",
                           type="not_found_error", param="model", code="model_not_found")
        return model

    def sampling(self, req: Any) -> list[SamplingParams]:
        n = req.n or 1
        budget = req.token_budget()
        max_tokens = self.limits.default_max_tokens if budget is None else budget
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        seeds = [None] * n if req.seed is None else [(req.seed + i) % 2**63 for i in range(n)]
        return [SamplingParams(max_tokens, temperature, top_p, s) for s in seeds]

    async def encode(self, endpoint: Any, req: Any) -> list[list[int]]:
        """Tokenize every prompt off the loop; a text the tokenizer cannot take is a 400 naming the field."""
        prompts = []
        for text in endpoint.texts(req):
            try:
                ids = await asyncio.to_thread(endpoint.encode, self.backend, text)
            except (RequestError, ApiError):
                raise
            except Exception as e:  # noqa: BLE001 - whatever the tokenizer raised, it is this input's fault
                raise ApiError(400, f"{endpoint.param}: the tokenizer cannot encode this text ({type(e).__name__})",
                               param=endpoint.param, code="invalid_text") from e
            if len(ids) > self.limits.max_prompt_tokens:
                raise ApiError(413, f"prompt has {len(ids)} tokens; the server limit is {self.limits.max_prompt_tokens}",
                               param=endpoint.param, code="context_length_exceeded")
            prompts.append(ids)
        return prompts

    async def __call__(self, endpoint: Any, req: Any, request: Request) -> Any:
        model = self.check_model(req.model)
        params = self.sampling(req)
        prompts = await self.encode(endpoint, req)
        n, max_tokens = len(params), params[0].max_tokens
        self.scheduler.admit([], prompts, n, max_tokens)  # refuse early, before routing costs anything
        routes = [await asyncio.to_thread(self.backend.route, model, ids) for ids in prompts]
        self.scheduler.admit(routes, prompts, n, max_tokens)  # no await from here to the last submit
        sink: asyncio.Queue | None = asyncio.Queue() if req.stream else None
        tickets = [t for k, (ids, route) in enumerate(zip(prompts, routes))
                   for t in self.scheduler.submit(route, [(ids, p) for p in params], req.stop_list(), sink=sink,
                                                  first_index=k * n)]
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        call = _Call(f"{endpoint.prefix}-{uuid.uuid4().hex}", int(time.time()), model, req, prompts, tickets)
        timeout = self.limits.generation_timeout_s
        if sink is not None:
            return StreamingResponse(event_stream(tickets, sink, request, _StreamChunks(endpoint, call), timeout),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        settled = await wait_rows(tickets, request, timeout)
        if settled is None:
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        err = failure(settled, timeout)
        if err is not None:
            if err.status == 504:
                self.metrics.timeouts.inc()
                log.warning("%s: generation exceeded %g s: 504", call.id, timeout)
            raise err
        outcomes: list[RowOutcome] = settled  # type: ignore[assignment]
        extra = {"taskmoe": call.trace(outcomes)} if req.wants_trace else {}
        return endpoint.response(call, outcomes, usage=call.usage(outcomes), **extra)
