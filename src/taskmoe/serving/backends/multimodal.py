"""Serve a multimodal DOE model (``taskmoe train modality``): chat messages may carry one image or audio clip.

Text requests are served exactly like a DOE model's (:class:`~taskmoe.serving.backends.doe.DOEBackend`
semantics, through the modality-guarded routing, so text answers equal the text model's). A
request with an ``image_url`` / ``input_audio`` part (decoded and size-checked by
:mod:`taskmoe.serving.media`) becomes the media prompt the model was trained on -- the medium's
placeholder positions, then the last user message's text -- and its rows get a batching key of
their own: the medium rides with the route, and :meth:`MultimodalBackend.model_for` hands the
decoder a :class:`~taskmoe.inference.media.Broadcast` view that splices it into the prefill. The
trace names the modality expert that took the sequence.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from taskmoe.data.media_tasks import media_prompt
from taskmoe.doe.modality.model import MediaInput, MultimodalLM, load_multimodal, model_tokenizer
from taskmoe.inference.media import Broadcast, media_tensor, placeholder_of
from taskmoe.serving.backend import Route
from taskmoe.serving.backends.lm import LMBackend
from taskmoe.serving.media import MediaError, MediaLimits, media_prompt_of

MAX_PENDING = 1024  # media of routed requests waiting for their batch


class MediaIds(list):
    """Prompt ids that carry their medium (``modality``, encoder-ready ``value``) to :meth:`MultimodalBackend.route`."""

    modality: str
    value: torch.Tensor


class MultimodalBackend(LMBackend):
    """Multimodal DOE models behind one tokenizer; route key = (model id, experts[, media request id])."""

    media_limits = MediaLimits()

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._media: OrderedDict[str, tuple[str, torch.Tensor]] = OrderedDict()

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None, stop_ids: Sequence[int] | None = None,
             device: str | torch.device = "cpu") -> "MultimodalBackend":
        """A multimodal folder with its tokenizer: its own or the one beside it, or for a model on an
        upcycled backbone the backbone's (chat requests then use its chat template)."""
        return cls.one_folder(path, load_multimodal, name=name, stop_ids=stop_ids, device=device,
                              tokenizer_of=model_tokenizer)

    def encode_chat_media(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Messages whose last user turn has one image/audio part -> :class:`MediaIds`."""
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise MediaError("messages: a media request needs a user message")
        if any(not isinstance(m["content"], str) and any(p.get("type") != "text" for p in m["content"])
               for m in messages if m is not users[-1]):
            raise MediaError("messages: only the last user message may hold an image or audio part")
        prompt = media_prompt_of(users[-1]["content"], self.media_limits, "messages[-1].content")
        if prompt.modality is None:
            raise MediaError("messages: the image or audio part must be in the last user message")
        model: MultimodalLM = next(iter(self.models.values()))  # type: ignore[assignment]
        if prompt.modality not in model.experts:
            raise MediaError(f"this model has no {prompt.modality} expert (modalities: {sorted(model.experts)})")
        ids, _ = media_prompt(self.tokenizer, prompt.text, prompt.modality, model.n_positions(prompt.modality),
                              placeholder_of(model, self.tokenizer))
        out = MediaIds(ids)
        out.modality, out.value = prompt.modality, media_tensor(model, prompt.modality, prompt.value)
        return out

    def route(self, model_id: str, prompt_ids: Sequence[int]) -> Route:
        model: MultimodalLM = self.models[model_id]  # type: ignore[assignment]
        device = next(model.parameters()).device
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        modality = getattr(prompt_ids, "modality", None)
        media = [] if modality is None else [
            MediaInput.full(modality, prompt_ids.value.unsqueeze(0).to(device), ids == placeholder_of(model, self.tokenizer))]
        with torch.inference_mode():
            r = model.route(ids, media)
        experts = tuple(name for name in r.expert_names()[0])
        trace = {"model": model_id, "modality": modality or "text", "experts": list(experts),
                 "scores": {n: float(p) for n, p in zip(r.names, r.scores[0].tolist())}, "fallback": bool(r.fallback[0])}
        if modality is None:
            return Route(key=(model_id, tuple(sorted(experts))), trace=trace)
        token = uuid.uuid4().hex
        pending = self._media
        pending[token] = (modality, prompt_ids.value)
        while len(pending) > MAX_PENDING:
            pending.popitem(last=False)
        return Route(key=(model_id, tuple(sorted(experts)), token), trace=trace)

    def model_for(self, route: Route) -> Any:
        model = self.models[route.key[0]]
        if len(route.key) == 2:
            return model
        found = self._media.get(route.key[2])
        if found is None:
            raise MediaError("the medium of this request is no longer held (too many requests in flight); retry")
        return Broadcast(model, found[0], found[1], placeholder_of(model, self.tokenizer))  # type: ignore[arg-type]
