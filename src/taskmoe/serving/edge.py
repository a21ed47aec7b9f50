"""ASGI middleware at the edge: body size and read-time limits, and per-route request metrics.

- **Body limit**: a ``Content-Length`` over ``max_bytes`` is refused (413) before anything is read;
  a body without one is counted while it is read and refused the moment it passes the limit.
- **Body read timeout**: the whole body must arrive within ``timeout_s`` (a client that announced
  more than it sends would otherwise hold the connection forever). Past it the request is
  answered 408 with ``Connection: close`` and logged as one warning line.
- The body is read once (it is small by construction) and replayed to the app; later ``receive``
  calls go to the server, so disconnect detection keeps working for streaming responses.

Plain ASGI rather than ``@app.middleware("http")`` so streaming and disconnects pass through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from taskmoe.serving.errors import ApiError
from taskmoe.serving.metrics import ServerMetrics

log = logging.getLogger("taskmoe.serving")

__all__ = ["Edge"]


class Edge:
    """Body limits, body read timeout and request metrics (see the module docstring)."""

    def __init__(self, app: Callable, max_bytes: int, timeout_s: float, metrics: ServerMetrics) -> None:
        self.app, self.max_bytes, self.timeout_s, self.metrics = app, max_bytes, timeout_s, metrics

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
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            if route.endswith("completions"):
                self.metrics.latency.labels(route=route).observe(time.monotonic() - t0)

    async def _limited(self, scope: dict, receive: Callable, send: Callable) -> None:
        too_large = ApiError(413, f"request body exceeds the server limit of {self.max_bytes} bytes",
                             code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large.response()(scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                log.warning("%s %s: request body not received within %g s (%d bytes read): 408", scope.get("method"),
                            scope.get("path"), self.timeout_s, size)
                slow = ApiError(408, f"request body not received within {self.timeout_s:g} s", code="body_timeout",
                                headers={"Connection": "close"})
                return await slow.response()(scope, receive, send)
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
