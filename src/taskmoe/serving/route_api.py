"""``POST /v1/route``: which expert(s) a request goes to, with confidences and the routing trace.

Sequence routing decides the experts once, from the prompt, so the decision can be served apart
from the generation: a front end calls ``/v1/route`` and forwards the request to whatever serves
the chosen experts. Backbone experts are PEFT LoRA adapters, so that can be an existing
multi-LoRA engine, e.g.::

    vllm serve BACKBONE_DIR --enable-lora --max-lora-rank 16 \\
        --lora-modules c0=RUN/experts/c0 c1=RUN/experts/c1 c2=RUN/experts/c2 c3=RUN/experts/c3

and the request goes there with ``"model": <lora_module of the top expert>``. The answer names,
per selected expert (most confident first), its category, confidence, mixing weight and adapter
folder (``lora_module`` = the expert's name, ``adapter`` its folder), plus the router's trace
(every category's calibrated confidence, complexity c_S, threshold t_C, fallback, cross-talk pair).

Only backends that route with a router (IMoE and backbone systems: ``backend.system.router``) get
the route; routing runs off the event loop (:func:`asyncio.to_thread`; a backbone encoder's pass
holds the backbone's switch lock, so it never races a decode).

(No ``from __future__ import annotations``: FastAPI reads the request model as a real annotation.)
"""

import asyncio
from typing import Any, Optional

from fastapi import FastAPI
from pydantic import BaseModel, Field

from taskmoe.errors import RequestError
from taskmoe.serving.errors import ERROR_RESPONSES
from taskmoe.serving.schemas import NonEmptyText, _Strict

__all__ = ["RouteRequest", "RouteResponse", "add_route_endpoint", "route_answer"]


class RouteMessage(_Strict):
    role: str
    content: NonEmptyText


class RouteRequest(_Strict):
    """A prompt (completion style) or chat messages (system messages optional, one user message)."""

    model: Optional[str] = None
    prompt: Optional[NonEmptyText] = None
    messages: Optional[list[RouteMessage]] = Field(default=None, min_length=1)


class RoutedExpert(BaseModel):
    name: str
    category: str
    confidence: float
    weight: float
    lora_module: str
    adapter: Optional[str] = None


class RouteResponse(BaseModel):
    object: str = "route"
    model: str
    experts: list[RoutedExpert]
    fallback: bool
    crosstalk: Optional[list[str]] = None
    prompt_tokens: int
    trace: dict[str, Any]


def route_answer(backend: Any, req: RouteRequest) -> RouteResponse:
    """Route one request with the backend's system (blocking; see :func:`add_route_endpoint`)."""
    if (req.prompt is None) == (req.messages is None):
        raise RequestError("send exactly one of 'prompt' or 'messages'")
    model = req.model or backend.model_ids()[0]
    if model not in backend.model_ids():
        raise RequestError(f"unknown model {model!r}; this server routes for {backend.model_ids()}")
    ids = (backend.encode_prompt(req.prompt) if req.prompt is not None
           else backend.encode_chat([m.model_dump() for m in req.messages or []]))
    system = backend.system
    d = system.router.route_batch([ids])[0]
    store = system.store
    experts = [RoutedExpert(name=system.expert_of[c], category=c, confidence=float(d.confidences[i]),
                            weight=float(w), lora_module=system.expert_of[c],
                            adapter=str(store.folder(system.expert_of[c])) if system.expert_of[c] in store else None)
               for i, c, w in zip(d.selected, d.selected_names, d.weights)]
    pair = [d.categories[i] for i in d.crosstalk] if d.crosstalk is not None else None
    return RouteResponse(model=model, experts=experts, fallback=bool(d.fallback), crosstalk=pair,
                         prompt_tokens=len(ids), trace={**d.to_dict(), "selected_names": d.selected_names})


def add_route_endpoint(app: FastAPI, backend: Any) -> bool:
    """Add ``POST /v1/route`` when ``backend`` routes with a router; returns whether it did."""
    system = getattr(backend, "system", None)
    if getattr(system, "router", None) is None:
        return False

    @app.post("/v1/route", response_model=RouteResponse, response_model_exclude_none=True, tags=["taskmoe"],
              responses={k: ERROR_RESPONSES[k] for k in (400, 401, 422)})
    async def route(req: RouteRequest) -> RouteResponse:
        return await asyncio.to_thread(route_answer, backend, req)

    return True
