"""taskmoe.serving: an OpenAI-compatible HTTP server over taskmoe models.

Modules: ``limits`` (every limit, at the top), ``backend`` (the protocol the server drives and the
row/route types), ``backends`` (implementations: LM folders, DOE, IMoE runs; the continuous
``RowBatch``), ``costs`` (measured prefill and decode-step seconds, the backlog's predicted
seconds), ``admission`` (work estimate, the rule, 429 + Retry-After), ``tickets`` (one
row in flight), ``scheduler`` (continuous expert-grouped batching, cancellation within one step),
``textstream`` (incremental detokenization and stop sequences), ``schemas`` (strict OpenAI
request/response models), ``metrics`` (``prometheus_client``), ``errors`` (OpenAI error JSON),
``auth`` (Bearer key on all but ``/health``), ``edge`` (body limits and read timeout),
``streaming`` (SSE), ``completion`` (the one completion handler), ``routes``, ``app``
(``create_app``), ``health`` (start-up component checks), ``serve`` (the ``taskmoe serve`` command).

FastAPI, pydantic, uvicorn and prometheus_client are the optional ``[serve]`` extra. This package and the ``serve``
command import without them; :func:`require_serve_extra` raises a clear error when they are
missing, and ``create_app`` is resolved lazily.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from taskmoe.errors import TaskmoeError

SERVE_EXTRA_MODULES = ("fastapi", "pydantic", "starlette", "uvicorn", "prometheus_client")


class ServeExtraMissing(TaskmoeError, ImportError):
    """The optional HTTP dependencies are not installed."""


def require_serve_extra() -> None:
    """Raise :class:`ServeExtraMissing` naming what to install if FastAPI/uvicorn are absent."""
    missing = [m for m in SERVE_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeExtraMissing(
            f"serving needs {', '.join(missing)} (the optional [serve] extra): pip install 'taskmoe[serve]'"
        )


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from taskmoe.serving.app import create_app

        return create_app
    raise AttributeError(f"module 'taskmoe.serving' has no attribute {name!r}")


__all__ = ["ServeExtraMissing", "create_app", "require_serve_extra"]
