"""The parts of an IMoE :class:`~taskmoe.inference.pipeline.System` one calls alone, for evaluation.

:class:`SystemParts` holds them apart from the pipeline itself (which only composes the stages):
drafting a batch of prompts by chosen experts, intent detection, the intent head's features, the
disagreement assessment of a set of drafts, and whether an intent switches the summarizer's
adapter. ``System`` inherits them, so ``system.draft(...)`` and the rest keep their names; each
runs the same stage objects or pure functions the pipeline runs, so an evaluation measures what
is served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from taskmoe.errors import ConfigError
from taskmoe.inference.stages import (Call, Draft, RecordingStore, Route, Row, prompt_head, summarizer_features,
                                      uses_adapter)
from taskmoe.inference.trace import Trace
from taskmoe.router.policy import RoutingDecision
from taskmoe.summarizer.disagreement import DisagreementConfig, DisagreementReport, assess
from taskmoe.summarizer.fuser import Draft as DraftIds
from taskmoe.summarizer.intent import IntentResult

if TYPE_CHECKING:
    from taskmoe.inference.pipeline import PipelineConfig

__all__ = ["SystemParts"]


class SystemParts:
    """Evaluation entry points over a system's router, experts, summarizer and intent head (module docstring).

    Expects the attributes :class:`~taskmoe.inference.pipeline.System` sets: ``tokenizer``, ``router``,
    ``store``, ``expert_of``, ``summarizer``, ``intent``, ``fmt``, ``config``, ``mode``, ``adapters``.
    """

    tokenizer: Any
    router: Any
    store: Any
    expert_of: dict[str, str]
    summarizer: Any
    intent: Any
    fmt: Any
    config: Any

    def draft(self, prompts: Sequence[Sequence[int]], decisions: Sequence[RoutingDecision] | None = None, *,
              cfg: PipelineConfig | None = None, store: Any = None) -> list[list[DraftIds]]:
        """Each prompt's drafts by its selected experts (most confident first); one pass per expert.

        ``decisions`` (default: route now) may select any experts, e.g. a forced pair for an evaluation.
        """
        cfg = cfg or self.config
        rows = [Row(i, [int(t) for t in p], cfg, Trace(prompt="", prompt_tokens=len(p), mode=self.mode, routing={}))
                for i, p in enumerate(prompts)]
        call = Call(cfg, store if store is not None else RecordingStore(self.store))
        if decisions is None:
            rows = Route(self.router)(rows, call)
        else:
            for r, d in zip(rows, decisions):
                r.decision = d
        return [r.drafts for r in Draft(self.expert_of, self.tokenizer)(rows, call)]

    def detect_intent(self, prompts: Sequence[Sequence[int]]) -> list[IntentResult | None]:
        """Intent of each prompt from the summarizer's pooled ``<|bos|><|user|> prompt`` states (None without a head)."""
        if self.intent is None or self.fmt is None:
            return [None] * len(prompts)
        return self.intent.predict(self.features([prompt_head(self.fmt, p) for p in prompts]))

    def features(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """The intent head's input: mean-pooled summarizer hidden states (adapter off), (N, D)."""
        if self.summarizer is None:
            raise ConfigError("features: this system has no summarizer (experts-only mode)")
        return summarizer_features(self.summarizer, seqs, self.tokenizer.pad_id)

    def assess(self, prompt: Sequence[int], drafts: Sequence[DraftIds], cfg: DisagreementConfig | None = None) -> DisagreementReport:
        """Disagreement of ``drafts`` (router-encoder similarity + intent consistency with the prompt)."""
        intent_probs = None
        if self.intent is not None and self.fmt is not None:
            clf, fmt = self.intent, self.fmt

            def intent_probs(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
                return clf(self.features([prompt_head(fmt, s) for s in seqs]))

        return assess([x.expert for x in drafts], [x.confidence for x in drafts], [list(x.ids) for x in drafts],
                      self.router.encode, cfg or self.config.disagreement, intent_probs=intent_probs,
                      intent_labels=self.intent.labels if self.intent is not None else None, prompt_ids=list(prompt))

    def uses_adapter(self, intent: IntentResult | None, cfg: PipelineConfig | None = None) -> bool:
        """True when ``intent`` switches the summarizer's adapter on (and that adapter is loaded)."""
        return uses_adapter(intent, cfg or self.config, self.adapters)
