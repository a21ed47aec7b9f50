"""Serve a DOE model (``taskmoe.doe``): the routing key is the set of experts its gates accept.

A :class:`~taskmoe.doe.model.DOETransformer` routes each sequence once, from its prompt, and keeps
that decision in its decoding state; generated tokens never change it. The server asks the model
for the same decision before batching (:meth:`DOETransformer.route` pools the same prompt tokens
the prefill pools), so a batch holds only sequences that run through the same experts and each
MoE layer touches one expert set per step. Decoding is the LM backend's (``generate_batch`` and
the continuous ``open_batch`` of :mod:`~taskmoe.serving.backends.decode`): the model has the
``CausalLM`` interface; only :meth:`DOEBackend.model_for` differs.

On disk: a ``doe`` component folder (:func:`taskmoe.doe.model.save_doe`) with ``tokenizer.json``
inside it or beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from taskmoe.doe.model import DOETransformer, load_doe
from taskmoe.serving.backend import Route
from taskmoe.serving.backends.lm import LMBackend


class DOEBackend(LMBackend):
    """DOE models behind one tokenizer; route key = (model id, accepted experts)."""

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None, stop_ids: Sequence[int] | None = None,
             device: str | torch.device = "cpu") -> "DOEBackend":
        return cls.one_folder(path, load_doe, name=name, stop_ids=stop_ids, device=device)

    def route(self, model_id: str, prompt_ids: Sequence[int]) -> Route:
        model: DOETransformer = self.models[model_id]  # type: ignore[assignment]
        device = next(model.parameters()).device
        with torch.inference_mode():
            r = model.route(torch.tensor([list(prompt_ids)], dtype=torch.long, device=device))
        ids = [int(i) for i in r.ids[0].tolist() if i >= 0]
        experts = tuple(r.names[i] for i in ids)
        trace = {
            "model": model_id,
            "experts": list(experts),
            "weights": [float(w) for w in r.weights[0, : len(ids)].tolist()],
            "scores": {n: float(p) for n, p in zip(r.names, r.scores[0].tolist())},
            "fallback": bool(r.fallback[0]),
        }
        return Route(key=(model_id, tuple(sorted(experts))), trace=trace)

    def model_for(self, route: Route) -> DOETransformer:
        model_id, _experts = route.key
        return self.models[model_id]  # type: ignore[return-value]
