"""OpenAI-style errors: :class:`ApiError`, the documented error responses, and the app's handlers.

Every error body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Which status:

- 400: malformed input the schema cannot express: a body that is not JSON or not an object, text
  that is not encodable Unicode (a lone surrogate, naming the field), text the tokenizer cannot
  take, a backend's :class:`~taskmoe.errors.RequestError` / :class:`~taskmoe.errors.DataError`;
- 401 missing/wrong key, 404 unknown model or route, 408 body not received in time, 413 body or
  prompt too large, 422 schema violation (naming the field);
- 429: refused by admission before any work (:class:`~taskmoe.serving.admission.Refused`), with
  ``Retry-After`` when retrying later can help;
- 503: a component the request needs failed (:class:`~taskmoe.serving.backend.ComponentUnavailable`,
  naming it); 504: the deadline passed.

A server never answers 500 to client input: 500 is left for a bug, logged as one line (type and
message, no request text), with a body that names only the exception type.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from taskmoe.errors import DataError, RequestError, TaskmoeError
from taskmoe.serving.admission import Refused
from taskmoe.serving.backend import ComponentUnavailable
from taskmoe.serving.schemas import UNENCODABLE, ErrorResponse

log = logging.getLogger("taskmoe.serving")

__all__ = ["ApiError", "ERROR_RESPONSES", "install_error_handlers", "timeout_error", "unavailable"]

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "malformed request: not JSON, text that is not valid Unicode or that the tokenizer cannot take",
        401: "missing or wrong API key",
        404: "unknown model",
        408: "the request body was not received in time",
        413: "request body or prompt too large",
        422: "request does not match the schema",
        429: "refused before any work (server busy: retry after Retry-After seconds; or over one request's share)",
        503: "a component the request needs (an expert, an adapter) is unavailable",
        504: "generation timed out",
    }.items()
}


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


def timeout_error(seconds: float) -> ApiError:
    return ApiError(504, f"generation exceeded {seconds:g} s", type="timeout_error", code="timeout")


def unavailable(e: ComponentUnavailable) -> ApiError:
    return ApiError(503, str(e), type="service_unavailable", param=e.component, code="component_unavailable")


def refused(e: Refused) -> ApiError:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return ApiError(429, str(e), type="rate_limit_error", code=e.code, headers=headers)


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "content")`` -> ``"messages.0.content"``."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def _validation(errs: Sequence[dict[str, Any]]) -> ApiError:
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        return ApiError(400, "request body must be a JSON object (send Content-Type: application/json)",
                        code="invalid_json")
    bad_text = [e for e in errs if e.get("type") == UNENCODABLE]
    if bad_text:
        param = field_name(bad_text[0].get("loc", ()))
        return ApiError(400, f"{param}: {bad_text[0].get('msg')}", param=param, code="invalid_text")
    more = f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
    param = field_name(first.get("loc", ()))
    return ApiError(422, f"{param}: {first.get('msg')}{more}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception raised by a route as OpenAI's error JSON (see the module docstring)."""

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        return _validation(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), type=kind, headers=dict(e.headers or {})).response()

    @app.exception_handler(TaskmoeError)
    async def _taskmoe(_req: Request, e: TaskmoeError) -> JSONResponse:
        if isinstance(e, Refused):
            return refused(e).response()
        if isinstance(e, ComponentUnavailable):
            return unavailable(e).response()
        if isinstance(e, (RequestError, DataError)):
            return ApiError(400, str(e)).response()
        log.error("%s: %s", type(e).__name__, e)
        return ApiError(500, f"{type(e).__name__}: {e}", type="server_error").response()

    @app.exception_handler(Exception)
    async def _crash(_req: Request, e: Exception) -> JSONResponse:
        log.error("unhandled %s: %s", type(e).__name__, e)
        return ApiError(500, f"internal server error ({type(e).__name__})", type="server_error").response()
