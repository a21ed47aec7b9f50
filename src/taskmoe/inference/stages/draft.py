"""The Draft stage: every selected expert drafts for its rows, one batched decode per expert.

Rows are grouped by expert (an expert named by two selected categories of a row drafts once for
it); each expert is fetched from the store once per call (the trace says whether it was loaded
now or cached) and decodes its rows in chunks of ``draft_batch_size`` with
:func:`~taskmoe.inference.generate.generate_rows`: greedy, the draft repetition penalty, stopping
at ``<|eos|>``, ``draft_tokens`` new tokens (per row). This is THE draft function the summarizer is
trained on (:func:`draft_generator`, same settings). Every token is streamed (stage ``"draft"``)
and a row whose control says stop leaves the decode at once, keeping the tokens it drafted.
Drafts are stored most confident first (:func:`~taskmoe.summarizer.fuser.order_drafts`) and
recorded in the trace. Timed as ``drafts``.

:meth:`Draft.open` gives the same stage for continuous batching (:class:`DraftSession`): every
expert's decode is a step-wise :class:`~taskmoe.inference.session.DecodeSession` that rows of
later calls join between steps (same inputs, same config, so a row's drafts equal its solo run's).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from torch import nn

from taskmoe.inference.generate import GenerationConfig, generate, generate_rows
from taskmoe.inference.stages.base import Call, ExpertStage, Row
from taskmoe.inference.stages.ensemble import lm_input
from taskmoe.inference.stages.joined import JoinedDecode
from taskmoe.inference.trace import DraftRecord
from taskmoe.summarizer.drafts import GenerateFn
from taskmoe.summarizer.fuser import Draft as DraftIds
from taskmoe.summarizer.fuser import order_drafts

__all__ = ["Draft", "DraftSession", "draft_config", "draft_generator", "record_drafts"]


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

    def jobs(self, todo: list[Row]) -> dict[str, list[tuple[Row, float]]]:
        """expert -> its (row, confidence) pairs; an expert named by two selected categories of a row drafts once."""
        jobs: dict[str, list[tuple[Row, float]]] = defaultdict(list)
        for r in todo:
            assert r.decision is not None, "Draft runs after Route"
            mine: set[str] = set()
            for ci, cat in zip(r.decision.selected, r.decision.selected_names):
                name = self.expert_of[cat]
                if name not in mine:
                    mine.add(name)
                    jobs[name].append((r, float(min(max(r.decision.confidences[ci], 0.0), 1.0))))
        return jobs

    def inputs(self, job: list[tuple[Row, float]]) -> tuple[list[list[int]], list[GenerationConfig]]:
        """What an expert decodes for its rows: :func:`~taskmoe.inference.stages.ensemble.lm_input` (``<|bos|>
        prompt``, or the prompt as a user turn of a backbone's chat template) under THE draft config."""
        tok = self.tokenizer
        return ([lm_input(tok, r.prompt) for r, _ in job],
                [draft_config(tok.eos_id, r.cfg.draft_tokens, r.cfg.draft_repetition_penalty) for r, _ in job])

    def __call__(self, rows: list[Row], call: Call) -> list[Row]:
        todo = call.live(rows, self.name)
        jobs = self.jobs(todo)
        with call.clock("drafts"):
            for name in sorted(jobs):
                job = [(r, c) for r, c in jobs[name] if r.live and not r.check(self.name)]
                if not job:
                    continue
                model = call.store.get(name)
                size = call.cfg.draft_batch_size
                for s in range(0, len(job), size):
                    chunk = job[s : s + size]
                    outs = generate_rows(model, *self.inputs(chunk), emits=[call.emit(r, "draft", name) for r, _ in chunk])
                    for (r, c), o in zip(chunk, outs):
                        r.drafts.append(DraftIds(name, c, tuple(o.tokens)))
        for r in todo:
            self.done(r)
        return rows

    def done(self, r: Row) -> None:
        """A row's drafts are complete: most confident first, into its trace."""
        r.drafts = order_drafts(r.drafts)
        record_drafts(r, self.tokenizer)

    def open(self) -> "DraftSession":
        """This stage for continuous batching: rows of later calls join the experts' decodes between steps."""
        return DraftSession(self)


class DraftSession(JoinedDecode):
    """Every expert's drafts as step-wise decodes, one session per expert (see :mod:`.joined`).

    A row joins the session of each expert it drafts with; it is done when all of them ended
    (its drafts are then stored in expert-name order and ordered as :meth:`Draft.__call__`
    stores them, so a row's drafts equal its solo run's). A row that stops leaves every session at once.
    ``draft_batch_size`` does not apply here: whoever drives the session bounds its rows (the
    server's ``max_batch``).
    """

    timing = "drafts"
    stage_name = "draft"

    def __init__(self, stage: Draft) -> None:
        super().__init__(stage)
        self._pending: dict[int, tuple[Row, Call, set[str], dict[str, DraftIds]]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, rows: list[Row], call: Call) -> list[Row]:
        todo = call.live(rows, self.stage.name)
        jobs = self.stage.jobs(todo)
        for r in todo:
            self._pending[id(r)] = (r, call, set(), {})
        for name in sorted(jobs):
            model = call.store.get(name)
            job = jobs[name]
            for r, _ in job:
                self._pending[id(r)][2].add(name)
            self._decode((name, id(model)), lambda: model, [r for r, _ in job], call, *self.stage.inputs(job),
                         [(name, c) for _, c in job], stage="draft", expert=name)
        passed = [r for r in rows if id(r) not in self._pending]
        for r in [r for r in todo if not self._pending[id(r)][2]]:  # nothing to draft
            self._complete(r)
            passed.append(r)
        return passed

    def step(self) -> list[tuple[Row, Call]]:
        ended = self._step()
        for r, _call, (name, conf), out in ended:
            self._got(r, name, conf, out.tokens)
        stopped = [r for r, *_ in ended if not r.live]
        for r, _call, (name, conf), out in self._drop(stopped):
            self._got(r, name, conf, out.tokens)
        finished = [(r, call) for r, call, waiting, _ in self._pending.values() if not waiting]
        for r, _ in finished:
            self._complete(r)
        return finished

    def drop(self, rows: Sequence[Row]) -> None:
        for r, _call, (name, conf), out in self._drop(rows):
            self._got(r, name, conf, out.tokens)
        for r in rows:
            if id(r) in self._pending:
                self._complete(r)

    def _got(self, r: Row, name: str, conf: float, tokens: list[int]) -> None:
        entry = self._pending[id(r)]
        entry[2].discard(name)
        entry[3][name] = DraftIds(name, conf, tuple(tokens))

    def _complete(self, r: Row) -> None:
        _r, _call, _waiting, got = self._pending.pop(id(r))
        r.drafts.extend(got[n] for n in sorted(got))
        self.stage.done(r)
