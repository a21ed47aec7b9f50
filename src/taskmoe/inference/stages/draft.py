"""The Draft stage: every selected expert drafts for its rows, one batched decode per expert.

Rows are grouped by expert (an expert named by two selected categories of a row drafts once for
it); each expert is fetched from the store once per call (the trace says whether it was loaded
now or cached) and decodes its rows from :func:`~taskmoe.inference.stages.ensemble.lm_input`
(``<|bos|> prompt``, or the prompt as a user turn of a backbone's chat template) in chunks of ``draft_batch_size`` with
:func:`~taskmoe.inference.generate.generate_rows`: greedy, the draft repetition penalty, stopping
at ``<|eos|>``, ``draft_tokens`` new tokens (per row). This is THE draft function the summarizer is
trained on (:func:`draft_generator`, same settings). Every token is streamed (stage ``"draft"``)
and a row whose control says stop leaves the decode at once, keeping the tokens it drafted.
Drafts are stored most confident first (:func:`~taskmoe.summarizer.fuser.order_drafts`) and
recorded in the trace. Timed as ``drafts``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torch import nn

from taskmoe.inference.generate import GenerationConfig, generate, generate_rows
from taskmoe.inference.stages.base import Call, ExpertStage, Row
from taskmoe.inference.stages.ensemble import lm_input
from taskmoe.inference.trace import DraftRecord
from taskmoe.summarizer.drafts import GenerateFn
from taskmoe.summarizer.fuser import Draft as DraftIds
from taskmoe.summarizer.fuser import order_drafts

__all__ = ["Draft", "draft_config", "draft_generator", "record_drafts"]


def draft_config(eos_id: int, max_new_tokens: int, repetition_penalty: float = 1.2) -> GenerationConfig:
    """The drafts' decoding: greedy, penalised, stops at eos."""
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=repetition_penalty,
                            stop_tokens=[int(eos_id)])


def draft_generator(eos_id: int, repetition_penalty: float = 1.2) -> GenerateFn:
    """THE draft function as a plain ``generate(model, prompts, max_new_tokens)`` (training uses it)."""

    def run(model: nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return generate(model, prompts, draft_config(eos_id, max_new_tokens, repetition_penalty))

    return run


def record_drafts(row: Row, tokenizer: Any) -> None:
    """The row's drafts into its trace (text, confidence, tokens)."""
    row.trace.drafts = [DraftRecord(d.expert, d.confidence, tokenizer.decode(list(d.ids), skip_special=True), len(d.ids))
                        for d in row.drafts]


class Draft(ExpertStage):
    """Draft with the selected experts; ``expert_of`` maps a category to its expert's name."""

    name = "draft"

    def __call__(self, rows: list[Row], call: Call) -> list[Row]:
        todo = call.live(rows, self.name)
        jobs: dict[str, list[tuple[Row, float]]] = defaultdict(list)  # expert -> (row, confidence)
        for r in todo:
            assert r.decision is not None, "Draft runs after Route"
            mine: set[str] = set()
            for ci, cat in zip(r.decision.selected, r.decision.selected_names):
                name = self.expert_of[cat]
                if name not in mine:
                    mine.add(name)
                    jobs[name].append((r, float(min(max(r.decision.confidences[ci], 0.0), 1.0))))
        tok = self.tokenizer
        with call.clock("drafts"):
            for name in sorted(jobs):
                job = [(r, c) for r, c in jobs[name] if r.live and not r.check(self.name)]
                if not job:
                    continue
                model = call.store.get(name)
                size = call.cfg.draft_batch_size
                for s in range(0, len(job), size):
                    chunk = job[s : s + size]
                    outs = generate_rows(model, [lm_input(tok, r.prompt) for r, _ in chunk],
                                         [draft_config(tok.eos_id, r.cfg.draft_tokens, r.cfg.draft_repetition_penalty)
                                          for r, _ in chunk],
                                         emits=[call.emit(r, "draft", name) for r, _ in chunk])
                    for (r, c), o in zip(chunk, outs):
                        r.drafts.append(DraftIds(name, c, tuple(o.tokens)))
        for r in todo:
            r.drafts = order_drafts(r.drafts)
            record_drafts(r, tok)
        return rows
