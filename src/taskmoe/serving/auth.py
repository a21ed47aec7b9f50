"""Bearer-token authentication as ASGI middleware: every path but ``/health`` needs the key.

Written as middleware rather than a FastAPI dependency so nothing can be left out by accident:
``/v1/*``, ``/metrics``, the generated docs (``/docs``, ``/redoc``, ``/openapi.json``) and even
unknown paths (a 404 would tell a scanner which routes exist) are behind the key. ``/health``
stays open for load balancers. The token is compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
from typing import Callable, Iterable

from taskmoe.serving.errors import ApiError

__all__ = ["BearerAuth", "OPEN_PATHS"]

OPEN_PATHS = frozenset({"/health"})


class BearerAuth:
    """Refuse (401, ``WWW-Authenticate: Bearer``) any HTTP request without ``Authorization: Bearer <key>``."""

    def __init__(self, app: Callable, api_key: str, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app, self._key, self.open_paths = app, api_key.encode(), frozenset(open_paths)

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        header = dict(headers).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths or self.authorized(scope.get("headers") or []):
            return await self.app(scope, receive, send)
        err = ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
        await err.response()(scope, receive, send)
