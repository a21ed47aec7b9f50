"""Evaluation of modality experts: accuracy of generated answers, and who takes which sequences.

- :func:`answer_accuracy` generates the answer of every (medium, template) question greedily and
  compares the generated *text* with the template's answer (``"7"``, ``"a handwritten seven"``):
  exact match after stripping, so a caption must be right word for word.
- :func:`routing_shares` reports, for media questions and for text prompts, the share of
  sequences whose routing chose the modality expert. Two numbers for text: ``taken`` (the guarded
  routing the model uses; the modality guard makes it 0 by construction) and ``gate_alone``
  (the modality gate's own decision ``p > tau`` before the guard), which measures what the gate
  learned.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from taskmoe.data.media_tasks import TEMPLATES, Template
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.doe.modality.model import MultimodalLM
from taskmoe.inference.generate import GenerationConfig
from taskmoe.inference.media import MediaQuestion, generate_media


def _value(modality: str, x: torch.Tensor, rate: int) -> Any:
    return (x.numpy(), rate) if modality == "audio" else x.numpy()


def answer_accuracy(model: MultimodalLM, tok: Tokenizer, modality: str, media: torch.Tensor, labels: Sequence[int],
                    templates: Sequence[Template] | None = None, *, max_new_tokens: int = 8) -> dict[str, Any]:
    """Per template: exact-match accuracy of the generated answers, share taken by the modality expert, fallbacks."""
    rate = model.encoders[modality].cfg.sample_rate if modality == "audio" else 0
    expert = model.experts[modality]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=[tok.eos_id])
    out: dict[str, Any] = {}
    model.eval()
    for tpl in templates or TEMPLATES[modality]:
        qs = [MediaQuestion(tpl.prompt, modality, _value(modality, x, rate)) for x in media]
        ans = generate_media(model, tok, qs, cfg)
        want = [tpl.fill(int(y)) for y in labels]
        out[tpl.prompt] = {
            "accuracy": float(np.mean([a.text == w for a, w in zip(ans, want)])),
            "taken_by_expert": float(np.mean([expert in a.experts for a in ans])),
            "fallback": float(np.mean([a.fallback for a in ans])),
            "n": len(ans),
            "examples": [(w, a.text) for w, a in zip(want[:3], ans[:3])],
        }
    return out


@torch.no_grad()
def routing_shares(model: MultimodalLM, text_prompts: torch.Tensor, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """For each modality expert: the share of ``text_prompts`` (N, P) it takes (guarded) and its gate alone accepts."""
    model.eval()
    names = model.base.gate.names
    tau = model.base.gate.tau
    res: dict[str, dict[str, float]] = {}
    taken = {m: 0 for m in model.experts}
    alone = {m: 0 for m in model.experts}
    for i in range(0, len(text_prompts), batch_size):
        r = model.route(text_prompts[i : i + batch_size])
        chosen = r.expert_names()
        for m, e in model.experts.items():
            taken[m] += sum(e in c for c in chosen)
            alone[m] += int((r.scores[:, names.index(e)] > tau).sum())
    n = max(1, len(text_prompts))
    for m in model.experts:
        res[m] = {"text_taken": taken[m] / n, "text_gate_alone": alone[m] / n}
    return res
