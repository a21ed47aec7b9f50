"""Server-sent events for streamed completions, and waiting on rows while watching the client.

:func:`event_stream` turns a request's rows into SSE bytes in OpenAI's chunk format: one
``data: <json>`` event per text piece (the rows' pieces arrive on one queue as ``(index, piece)``,
``(index, None)`` when a row ends), then each row's finish chunk, the optional trace and usage
chunks, and ``data: [DONE]``. An error after the 200 went out is an ``error`` event (OpenAI's
error object) followed by ``[DONE]``.

Both :func:`event_stream` and :func:`wait_rows` watch the connection: when the client goes away
the request's rows are cancelled at once (the scheduler drops them before its next step), and when
the deadline passes they are cancelled as timed out. No task is left behind and no future is left
with an unretrieved exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Protocol, Sequence

from fastapi import Request

from taskmoe.serving.backend import ComponentUnavailable
from taskmoe.serving.errors import ApiError, timeout_error, unavailable
from taskmoe.serving.tickets import RowOutcome, Ticket

log = logging.getLogger("taskmoe.serving")

__all__ = ["DONE", "sse", "event_stream", "wait_rows", "failure", "Chunks"]

DONE = b"data: [DONE]\n\n"
GRACE_S = 1.0
"""How long past the deadline a request waits for its rows to be halted before answering 504 anyway."""


def sse(obj: Any) -> bytes:
    """One SSE event holding a pydantic model (``None`` fields left out) or a JSON-safe object."""
    data = obj.model_dump_json(exclude_none=True) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n".encode()


class Chunks(Protocol):
    """The endpoint-specific chunks of a stream (chat deltas or completion text)."""

    def first(self, index: int) -> Any | None: ...

    def piece(self, index: int, text: str) -> Any: ...

    def last(self, index: int, finish: str) -> Any: ...

    def final(self, outcomes: list[RowOutcome]) -> list[Any]: ...


def _log_timeout(request: Request, timeout_s: float) -> None:
    log.warning("%s %s (stream): generation exceeded %g s: 504 event", request.method, request.url.path, timeout_s)


async def client_gone(request: Request) -> None:
    """Return when the client disconnects (the body was already read, so only disconnects remain)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


def cancel_all(tickets: Sequence[Ticket], *, timeout: bool = False) -> None:
    for t in tickets:
        t.cancel(timeout=timeout)


def failure(outcomes_or_errors: Sequence[BaseException | RowOutcome], seconds: float) -> ApiError | None:
    """The error to answer for finished rows: a backend failure (503 naming a component, else 500) or a timeout."""
    for o in outcomes_or_errors:
        if isinstance(o, ComponentUnavailable):
            return unavailable(o)
        if isinstance(o, BaseException):
            return ApiError(500, f"generation failed: {type(o).__name__}", type="server_error")
    if any(o.finish == "timeout" for o in outcomes_or_errors):  # type: ignore[union-attr]
        return timeout_error(seconds)
    return None


def _settled(tickets: Sequence[Ticket]) -> list[BaseException | RowOutcome]:
    return [t.done.exception() or t.done.result() for t in tickets]


async def wait_rows(tickets: Sequence[Ticket], request: Request, timeout_s: float) -> list[BaseException | RowOutcome] | None:
    """Every row's outcome (or its error), or None if the client went away first.

    Past the deadline (+ :data:`GRACE_S`) the rows are cancelled as timed out and the timeout is
    reported as an outcome with finish ``"timeout"``."""
    gone = asyncio.ensure_future(client_gone(request))
    pending = {t.done for t in tickets}
    deadline = max(t.deadline for t in tickets) + GRACE_S
    try:
        while pending:
            done, _ = await asyncio.wait(pending | {gone}, timeout=max(deadline - time.monotonic(), 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                cancel_all(tickets)
                return None
            if not done:
                cancel_all(tickets, timeout=True)
                return [RowOutcome("", [], "timeout", None)]
            pending -= done
    finally:
        gone.cancel()
    return _settled(tickets)


async def event_stream(tickets: Sequence[Ticket], sink: asyncio.Queue, request: Request, chunks: Chunks,
                       timeout_s: float) -> AsyncIterator[bytes]:
    """SSE bytes for rows streamed together; cancels every row if the stream stops early."""
    gone = asyncio.ensure_future(client_gone(request))
    deadline = max(t.deadline for t in tickets) + GRACE_S
    get: asyncio.Future | None = None
    try:
        for i in range(len(tickets)):
            if (head := chunks.first(i)) is not None:
                yield sse(head)
        open_rows = len(tickets)
        while open_rows:
            get = asyncio.ensure_future(sink.get())
            done, _ = await asyncio.wait({get, gone}, timeout=max(deadline - time.monotonic(), 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                if gone in done:
                    return
                cancel_all(tickets, timeout=True)
                _log_timeout(request, timeout_s)
                yield sse(timeout_error(timeout_s).body())
                yield DONE
                return
            i, piece = get.result()
            if piece is None:
                open_rows -= 1
            else:
                yield sse(chunks.piece(i, piece))
        settled = _settled(tickets)
        err = failure(settled, timeout_s)
        if err is not None:
            if err.status == 504:
                _log_timeout(request, timeout_s)
            yield sse(err.body())
        else:
            outcomes: list[RowOutcome] = settled  # type: ignore[assignment]
            for i, o in enumerate(outcomes):
                yield sse(chunks.last(i, o.finish))
            for extra in chunks.final(outcomes):
                yield sse(extra)
        yield DONE
    finally:
        gone.cancel()
        if get is not None:
            get.cancel()
        cancel_all(tickets)
