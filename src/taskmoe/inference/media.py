"""Generation with images and audio: media prompts through the one decoding loop of :mod:`taskmoe.inference.generate`.

:func:`generate_media` answers many ``(prompt, medium)`` questions with a
:class:`~taskmoe.doe.modality.MultimodalLM`. Prompts are grouped by (token length, modality, medium
shape); each group is one call of :func:`taskmoe.inference.generate.generate_rows` on a
:class:`Bound` view of the model that splices the group's media into its single prefill call
(a group has one length, so the loop prefills it in one batched forward, rows in the given order)
and records the routing the prefill decided. Decode steps are plain token steps: the media live
in the KV cache from then on and the routing in the decoding state.

Media values are numpy arrays in :mod:`taskmoe.data.media`'s conventions: an image ``(H, W)`` in
[0, 1] (resized by the encoder), audio a ``(samples, sample_rate)`` pair (resampled to the
encoder's rate, then cropped or zero-padded to its clip length, as in training).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from taskmoe.data.media import resample
from taskmoe.data.media_tasks import fit_audio, media_placeholder, media_prompt
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.doe.modality.model import MediaInput, MultimodalLM
from taskmoe.errors import RequestError
from taskmoe.inference.generate import GenerationConfig, generate_rows


@dataclass
class MediaQuestion:
    """A prompt and at most one medium (``modality`` None = a text question)."""

    prompt: str
    modality: str | None = None
    value: Any = None


@dataclass
class MediaAnswer:
    text: str
    tokens: list[int]
    experts: tuple[str, ...]
    fallback: bool
    modality: str | None
    scores: dict[str, float] = field(default_factory=dict)  # gate probability per expert


def placeholder_of(model: MultimodalLM, tok: Tokenizer) -> int:
    """The id at the placeholder positions: the model's own (saved with it), else the tokenizer's choice."""
    return model.placeholder_id if model.placeholder_id is not None else media_placeholder(tok)


def media_tensor(model: MultimodalLM, modality: str, value: Any) -> Tensor:
    """One medium as the tensor its encoder takes (image (H, W); audio resampled and fitted, (S,))."""
    enc = model.encoders[modality]
    if modality == "audio":
        samples, rate = value
        x = fit_audio(resample(np.asarray(samples, dtype=np.float32), int(rate), enc.cfg.sample_rate),
                      enc.cfg.clip_samples)
        return torch.from_numpy(x)
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 2:
        raise RequestError(f"an image must be (H, W) grayscale, got shape {arr.shape}")
    return torch.from_numpy(arr)


class _MediaLM(nn.Module):
    """A :class:`MultimodalLM` behind the one LM interface: vocabulary and states are the model's;
    subclasses decide which forward calls get media."""

    def __init__(self, model: MultimodalLM) -> None:
        super().__init__()
        self.model = model

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def init_state(self, batch_size: int, device=None, dtype=None):
        return self.model.init_state(batch_size, device, dtype)


class Bound(_MediaLM):
    """``model`` with ``media`` bound to its next prefill call (see module docstring)."""

    def __init__(self, model: MultimodalLM, media: Sequence[MediaInput]) -> None:
        super().__init__(model)
        self.media, self.pending, self.routing = list(media), True, None

    def forward(self, input_ids: Tensor, state: Any = None, *, logits_to_keep: int = 0):
        if not self.pending:
            return self.model(input_ids, state, logits_to_keep=logits_to_keep)
        for m in self.media:
            if m.mask.shape != input_ids.shape:
                raise RuntimeError(f"Bound: prefill of shape {tuple(input_ids.shape)} but media for {tuple(m.mask.shape)}")
        out = self.model(input_ids, state, media=self.media, logits_to_keep=logits_to_keep)
        self.pending, self.routing = False, out.routing
        return out


def generate_media(model: MultimodalLM, tok: Tokenizer, questions: Sequence[MediaQuestion],
                   cfg: GenerationConfig | None = None, *, group_size: int = 256) -> list[MediaAnswer]:
    """Answer each question (greedy by default); batches of at most ``group_size`` rows per prefill."""
    cfg = cfg or GenerationConfig(max_new_tokens=16, temperature=0.0, stop_tokens=[tok.eos_id])
    prompts: list[list[int]] = []
    values: list[Tensor | None] = []
    groups: dict[tuple, list[int]] = defaultdict(list)
    ph = placeholder_of(model, tok)
    for i, q in enumerate(questions):
        if q.modality is None:
            ids = tok.encode_prompt(q.prompt)
            values.append(None)
            key: tuple = (len(ids), None, ())
        else:
            ids, _ = media_prompt(tok, q.prompt, q.modality, model.n_positions(q.modality), ph)
            values.append(media_tensor(model, q.modality, q.value))
            key = (len(ids), q.modality, tuple(values[-1].shape))
        prompts.append(ids)
        groups[key].append(i)
    answers: list[MediaAnswer | None] = [None] * len(questions)
    for (_, modality, _), idx in groups.items():
        for start in range(0, len(idx), group_size):
            rows = idx[start : start + group_size]
            media = []
            if modality is not None:
                ids = torch.tensor([prompts[i] for i in rows])
                # the placeholders are the positions media_prompt filled with ph (no other ph in a prompt)
                media = [MediaInput.full(modality, torch.stack([values[i] for i in rows]), ids == ph)]
            bound = Bound(model, media)
            outs = generate_rows(bound, [prompts[i] for i in rows], [cfg] * len(rows))
            r = bound.routing
            names = r.expert_names()
            for j, (i, o) in enumerate(zip(rows, outs)):
                answers[i] = MediaAnswer(tok.decode(o.tokens, skip_special=True).strip(), o.tokens, names[j],
                                         bool(r.fallback[j]), modality,
                                         {n: float(r.scores[j, e]) for e, n in enumerate(r.names)})
    return answers  # type: ignore[return-value]


def answer_with_media(path: str | Path, prompt: str, *, image: str | Path | None = None, audio: str | Path | None = None,
                      **gen: Any) -> dict[str, Any]:
    """``taskmoe generate MODEL "What digit is this?" --image FILE.png`` (or ``--audio FILE.wav``, or neither).

    ``path`` is a ``multimodal`` folder (``taskmoe train modality``, on a from-scratch DOE model or an
    upcycled backbone). The result names the experts the
    gates chose (the modality expert for a media question) and their gate probabilities.
    """
    from taskmoe.data.media import read_image, read_wav
    from taskmoe.doe.modality.model import load_multimodal, model_tokenizer

    if image is not None and audio is not None:
        raise RequestError("give --image or --audio, not both (one medium per prompt)")
    model = load_multimodal(path)
    tok = model_tokenizer(path, model)
    if image is not None:
        q = MediaQuestion(prompt, "image", read_image(image))
    elif audio is not None:
        q = MediaQuestion(prompt, "audio", read_wav(audio))
    else:
        q = MediaQuestion(prompt)
    if q.modality is not None and q.modality not in model.experts:
        raise RequestError(f"{path}: this model has no {q.modality} expert (modalities: {sorted(model.experts)}); "
                           f"add one with taskmoe train modality --kind {q.modality}")
    cfg = GenerationConfig(**{"max_new_tokens": 16, "temperature": 0.0, **gen}, stop_tokens=[tok.eos_id])
    a = generate_media(model, tok, [q], cfg)[0]
    return {"answer": a.text, "model": str(path), "kind": "multimodal", "modality": a.modality or "text",
            "experts": ", ".join(a.experts), "fallback": a.fallback,
            "gates": ", ".join(f"{n}={p:.2f}" for n, p in a.scores.items())}


class Broadcast(_MediaLM):
    """``model`` that splices one medium into every row of every prefill (``T > 1``) whose ids hold the
    ``placeholder`` ids (:func:`placeholder_of`, :func:`~taskmoe.data.media_tasks.media_prompt`); other calls pass through.

    For a server batch that holds one request's rows only (``n`` choices of the same question): the
    rows join a continuous batch whenever the scheduler adds them, and each prefill gets the medium.
    """

    def __init__(self, model: MultimodalLM, modality: str, value: Tensor, placeholder: int) -> None:
        super().__init__(model)
        self.modality, self.value, self.placeholder = modality, value, placeholder

    def forward(self, input_ids: Tensor, state: Any = None, *, logits_to_keep: int = 0):
        mask = input_ids == self.placeholder if input_ids.shape[1] > 1 else None
        if mask is None or not bool(mask.any()):
            return self.model(input_ids, state, logits_to_keep=logits_to_keep)
        rows = torch.nonzero(mask.any(dim=1)).squeeze(1)
        values = self.value.to(input_ids.device).unsqueeze(0).expand(len(rows), *self.value.shape)
        return self.model(input_ids, state, media=[MediaInput(self.modality, values, mask, rows)],
                          logits_to_keep=logits_to_keep)
