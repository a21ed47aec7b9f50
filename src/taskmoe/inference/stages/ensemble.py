"""The Ensemble stage (experts-only mode): the selected experts' confidence-weighted mixture writes the answer.

Rows are grouped by their selected expert set; each group decodes once with
:class:`~taskmoe.inference.rowwise.EnsembleLM` (``p(x) = sum_e w_e p_e(x)``), each row's router
weights travelling with it as side data, each row under its own config and generator; the
input is :func:`lm_input` (the backbone's chat template in a backbone system). Tokens
stream as stage ``"answer"``; a row whose control says stop leaves the decode at once. Timed as
``ensemble``. :meth:`Ensemble.open` gives the same stage for continuous batching
(:class:`EnsembleSession`: one step-wise decode per expert set that rows of later calls join).

Cross-talk: this mode has no summarizer to read a dialogue, so a flagged pair is not talked out;
both experts of the pair are selected (the policy makes the second speaker join) and mixed, and
the trace's ``crosstalk`` says so (``ran: false`` with the reason).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from taskmoe.data.backbone_tokenizer import BackboneTokenizer
from taskmoe.inference.generate import generate_rows
from taskmoe.inference.rowwise import EnsembleLM
from taskmoe.inference.stages.base import Call, ExpertStage, Row
from taskmoe.inference.stages.joined import AnswerDecode

__all__ = ["Ensemble", "EnsembleSession", "ENSEMBLE_CROSSTALK", "lm_input"]

ENSEMBLE_CROSSTALK = ("experts-only mode: no summarizer reads a dialogue, so the pair is not talked out; "
                      "both experts of the pair are selected and mixed in the ensemble instead")


def lm_input(tok: Any, ids: list[int]) -> list[int]:
    """What the experts decode from: ``<|bos|> prompt``, or, with a pretrained backbone's tokenizer
    (experts are its LoRA adapters), the prompt as a user turn of its chat template, which an
    instruct backbone answers."""
    if isinstance(tok, BackboneTokenizer):
        return list(tok.encode_chat([{"role": "user", "content": tok.decode(list(ids))}]))
    return [tok.bos_id, *ids]


class Ensemble(ExpertStage):
    """Answer the live rows with the mixture of their selected experts."""

    name = "ensemble"

    def groups(self, todo: list[Row]) -> dict[tuple[str, ...], list[Row]]:
        """Rows by their selected expert set (a flagged pair is noted in the trace: not talked out)."""
        groups: dict[tuple[str, ...], list[Row]] = defaultdict(list)
        for r in todo:
            d = r.decision
            assert d is not None, "Ensemble runs after Route"
            groups[tuple(self.expert_of[c] for c in d.selected_names)].append(r)
            if d.crosstalk is not None:
                r.trace.crosstalk = {**self.crosstalk_entry(d), "reason": ENSEMBLE_CROSSTALK}
        return groups

    def inputs(self, group: list[Row]) -> tuple[list[list[int]], list[Any], list[torch.Tensor]]:
        """The group's prompts (:func:`lm_input`), answer configs and mixture weights (side data)."""
        tok = self.tokenizer
        return ([lm_input(tok, r.prompt) for r in group], [r.cfg.generation(tok.eos_id) for r in group],
                [torch.tensor(r.decision.weights, dtype=torch.float32) for r in group])  # type: ignore[union-attr]

    def __call__(self, rows: list[Row], call: Call) -> list[Row]:
        groups = self.groups(call.live(rows, "answer"))
        with call.clock("ensemble"):
            for names in sorted(groups):
                group = [r for r in groups[names] if r.live and not r.check("answer")]
                if not group:
                    continue
                prompts, cfgs, side = self.inputs(group)
                outs = generate_rows(EnsembleLM([call.store.get(n) for n in names]), prompts, cfgs,
                                     emits=[call.emit(r, "answer") for r in group], side=side)
                for r, o in zip(group, outs):
                    r.answer = o.tokens
        return rows

    def open(self) -> "EnsembleSession":
        """This stage for continuous batching: rows of later calls join their expert set's decode between steps."""
        return EnsembleSession(self)


class EnsembleSession(AnswerDecode):
    """The mixtures' decodes as step-wise sessions, one per expert set (see :mod:`.joined`)."""

    timing = "ensemble"

    def add(self, rows: list[Row], call: Call) -> list[Row]:
        todo = call.live(rows, "answer")
        for names, group in sorted(self.stage.groups(todo).items()):
            models = [call.store.get(n) for n in names]
            prompts, cfgs, side = self.stage.inputs(group)
            self._decode((names, *map(id, models)), lambda: EnsembleLM(models), group, call, prompts, cfgs,
                         [None] * len(group), stage="answer", side=side)
        return [r for r in rows if all(r is not t for t in todo)]
