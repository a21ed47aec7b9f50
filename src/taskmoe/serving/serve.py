"""The ``taskmoe serve PATH`` command: load a model folder and run the HTTP API under uvicorn.

Binds 127.0.0.1 unless ``--host`` says otherwise. ``--api-key`` (or ``$TASKMOE_API_KEY``, which
keeps the key out of the process list) puts every path but ``/health`` behind Bearer
authentication. Before the server listens (so before ``/health`` can say ok) every lazily loaded
component (each expert of an IMoE run) is read once and checked -- safetensors header, tensor names
and shapes against the model it rebuilds, every tensor's bytes -- and a bad one stops the command
with an error naming the file; ``--no-check-experts`` skips this for very large stores (a bad
expert is then found by the first request that needs it: 503 naming it, and ``/health`` lists it). Every limit of
:class:`~taskmoe.serving.limits.Limits` that matters operationally is a flag. FastAPI/uvicorn are
imported only when the command runs, so the CLI works without the ``[serve]`` extra installed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from taskmoe.config import check
from taskmoe.serving import require_serve_extra
from taskmoe.serving.backends import load_backend
from taskmoe.serving.limits import (
    BODY_TIMEOUT_S,
    GENERATION_TIMEOUT_S,
    MAX_BATCH,
    MAX_BODY_BYTES,
    MAX_MAX_TOKENS,
    MAX_PROMPT_TOKENS,
    MAX_WAIT_MS,
    QUEUE_SIZE,
    TOKEN_BUDGET,
    Limits,
)

API_KEY_ENV = "TASKMOE_API_KEY"
KEEP_ALIVE_S = 30
"""Seconds an idle keep-alive connection stays open: longer than clients' own expiry (httpx, and so
the openai client, use 5 s), so a client never reuses a connection the server is closing."""


def serve(
    path: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    name: Optional[str] = None,
    max_batch: int = MAX_BATCH,
    max_wait_ms: float = MAX_WAIT_MS,
    queue_size: int = QUEUE_SIZE,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    max_tokens: int = MAX_MAX_TOKENS,
    max_body_bytes: int = MAX_BODY_BYTES,
    timeout: float = GENERATION_TIMEOUT_S,
    token_budget: int = TOKEN_BUDGET,
    body_timeout: float = BODY_TIMEOUT_S,
    threads: int = 0,
    check_experts: bool = True,
    route_only: bool = False,
    weights: str = "fp32",
) -> dict:
    """Serve a model folder over an OpenAI-compatible HTTP API (needs FastAPI and uvicorn: the serve extra).

    PATH is a trained IMoE run folder (taskmoe.json), a DOE model folder, a causal LM component
    folder (tokenizer.json in it or beside it), or a folder of LM folders sharing one
    tokenizer.json (one model id per subfolder), or a backbone folder from `taskmoe backbone import`
    (chat requests use its own chat template). --name sets the model id of a single model.

    Binds 127.0.0.1 unless --host says otherwise. --api-key (or $TASKMOE_API_KEY) requires
    "Authorization: Bearer KEY" on every path but /health. --threads sets torch's intra-op threads
    (0: torch's default). Requests are admitted by work: --token-budget work tokens (n x (prompt +
    max_tokens)) at most in flight, and only while the backlog plus the request is predicted (from
    measured prefill and decode-step seconds) to finish within half of --timeout; refusals are 429
    with Retry-After from that prediction. --no-check-experts skips reading every expert file at start.
    --route-only serves /v1/route (which experts a request goes to, with confidences and the trace)
    and no completion endpoints: the front of a multi-LoRA engine that serves the experts (README).
    --weights int4 (a backbone folder or backbone system) keeps the backbone's projections in 4 bits
    (GGUF Q4_1's grid, int8 head; the experts stay float32 LoRA): faster decoding on CPU.
    """
    require_serve_extra()
    import torch
    import uvicorn

    from taskmoe.serving.app import create_app

    check(0 < port < 65536, f"--port must be in 1..65535, got {port}")
    check(threads >= 0, f"--threads must be >= 0, got {threads}")
    limits = Limits(
        max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size, max_prompt_tokens=max_prompt_tokens,
        max_max_tokens=max_tokens, default_max_tokens=min(Limits().default_max_tokens, max_tokens),
        max_body_bytes=max_body_bytes, generation_timeout_s=timeout, token_budget=token_budget,
        body_timeout_s=body_timeout, max_n=min(Limits().max_n, math.isqrt(queue_size)),
    )
    if threads:
        torch.set_num_threads(threads)
    backend = load_backend(path, name=name, weights=weights)
    checked = check_backend(backend) if check_experts else []
    app = create_app(backend, limits, api_key=api_key or os.environ.get(API_KEY_ENV) or None, route_only=route_only)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=KEEP_ALIVE_S)
    metrics = app.state.metrics
    return {
        "served": str(path),
        "models": ", ".join(backend.model_ids()),
        "components checked": len(checked) if check_experts else "skipped (--no-check-experts)",
        "batches": int(metrics.value("taskmoe_batches_total")),
        "completion tokens": int(metrics.value("taskmoe_completion_tokens_total")),
    }


def check_backend(backend: object) -> list[str]:
    """Read every component ``backend`` would load lazily (see the module docstring); their names."""
    check = getattr(backend, "check_components", None)
    if check is None:
        return []  # everything was loaded (and checked) when the backend was built
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        bar.add_task("checking experts", total=None)
        return list(check())
