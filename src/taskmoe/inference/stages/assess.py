"""The Assess stage: intent of every prompt, then the drafts' disagreement -> answer or clarification.

Everything model-side runs once for the whole batch:

- **intent** (timed ``intent``): ONE pooled pass of the summarizer (adapter off,
  :func:`summarizer_features`) over every row's ``<|bos|><|user|> prompt`` and every draft as
  ``<|bos|><|user|> draft``, then the intent head. A row keeps its prompt's
  :class:`~taskmoe.summarizer.intent.IntentResult` (which the Fuse stage reads to pick the
  adapter) and its probabilities; the drafts' probabilities feed the intent consistency. Nothing
  is computed twice;
- **disagreement** (timed ``disagreement``): ONE router-encoder pass over every draft, then per row
  :func:`~taskmoe.summarizer.disagreement.assess_embedded` (arithmetic on the precomputed rows).
  Above the threshold the row is answered by :func:`~taskmoe.summarizer.disagreement.clarification`
  (a question naming the conflicting experts), streamed at once as stage ``"clarification"``, and
  no later stage runs it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from taskmoe.inference.stages.base import Call, Row
from taskmoe.summarizer.disagreement import assess_embedded, clarification
from taskmoe.summarizer.fuser import FusionFormat
from taskmoe.summarizer.intent import IntentClassifier, pooled_hidden
from taskmoe.summarizer.switch import summarizer_adapter

__all__ = ["Assess", "prompt_head", "summarizer_features"]


def prompt_head(fmt: FusionFormat, ids: Sequence[int]) -> list[int]:
    """What the intent head reads: ``fmt.head(ids)`` (``<|bos|><|user|> ids``, or the backbone's user turn)."""
    return fmt.head(ids)


def summarizer_features(summarizer: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """The intent head's input: mean-pooled summarizer hidden states with every adapter off, (N, D)."""
    with summarizer_adapter(summarizer, None):  # intent decides whether the adapter runs: read without it
        return pooled_hidden(summarizer, seqs, pad_id=pad_id)


class Assess:
    """Intent + disagreement for the live rows (``intent`` None: no intent head, semantic score only)."""

    name = "assess"

    def __init__(self, summarizer: nn.Module, fmt: FusionFormat, intent: IntentClassifier | None,
                 encode: Callable[[Sequence[Sequence[int]]], Any], tokenizer: Any,
                 topics: Mapping[str, str] | None = None) -> None:
        self.summarizer, self.fmt, self.intent, self.encode = summarizer, fmt, intent, encode
        self.tokenizer = tokenizer
        self.topics = dict(topics or {})

    def _intents(self, todo: list[Row]) -> list[np.ndarray] | None:
        """Set each row's prompt intent; return each row's draft intent probabilities (n_i, K)."""
        if self.intent is None:
            return None
        heads = [prompt_head(self.fmt, r.prompt) for r in todo] + [prompt_head(self.fmt, d.ids) for r in todo for d in r.drafts]
        results = self.intent.predict(summarizer_features(self.summarizer, heads, self.tokenizer.pad_id))
        probs = np.array([[res.probs[label] for label in self.intent.labels] for res in results])  # (N + M, K)
        out, at = [], len(todo)
        for i, r in enumerate(todo):
            r.intent, r.intent_probs = results[i], probs[i]
            r.trace.intent = results[i].to_dict()
            out.append(probs[at : at + len(r.drafts)])
            at += len(r.drafts)
        return out

    def __call__(self, rows: list[Row], call: Call) -> list[Row]:
        todo = call.live(rows, self.name)
        if not todo:
            return rows
        with call.clock("intent"):
            draft_probs = self._intents(todo)
        with call.clock("disagreement"):
            seqs = [list(d.ids) for r in todo for d in r.drafts]
            emb = np.asarray(self.encode(seqs)) if seqs else np.zeros((0, 1))
            at = 0
            for i, r in enumerate(todo):
                n = len(r.drafts)
                if n:
                    self._assess(r, emb[at : at + n], None if draft_probs is None else draft_probs[i], call)
                at += n
        return rows

    def _assess(self, r: Row, emb: np.ndarray, draft_probs: np.ndarray | None, call: Call) -> None:
        cfg = r.cfg.disagreement
        rep = assess_embedded([d.expert for d in r.drafts], [d.confidence for d in r.drafts], emb, cfg,
                              draft_probs=draft_probs, prompt_probs=r.intent_probs,
                              intent_labels=self.intent.labels if self.intent is not None else None)
        r.report = rep
        r.trace.disagreement = rep.to_dict()
        if rep.clarify and rep.conflict is not None:
            r.trace.clarify = True
            r.trace.clarification = text = clarification(
                rep, {d.expert: t.text for d, t in zip(r.drafts, r.trace.drafts)},
                {d.expert: d.confidence for d in r.drafts}, topics=self.topics, n_keywords=cfg.n_keywords)
            if call.on_token is not None:
                for tok in self.tokenizer.encode(text, allow_special=False):
                    call.on_token(r.index, int(tok), "clarification", None)
