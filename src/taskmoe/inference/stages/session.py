"""The pipeline opened up for continuous batching: :class:`PipelineSession` (rows of later calls join between steps).

:meth:`System.generate_ids <taskmoe.inference.pipeline.System.generate_ids>` passes one list of
rows through the stages, each stage to the end, so a call holds the decoders until its last row
is answered. A session runs the same stages with the decode stages opened
(:meth:`Draft.open <taskmoe.inference.stages.draft.Draft.open>`, ``Fuse.open``, ``Ensemble.open``:
step-wise :class:`~taskmoe.inference.session.DecodeSession` s) and the others as they are:

- ``add(rows, call)``: a new call's rows run the stages before the first decode stage at once
  (Route: one batched routing pass), then **join** that stage's running decodes;
- ``step()``: ONE decode step of every decode stage, in pipeline order; rows whose stage work
  ended move on as a group per call (Crosstalk: the call's batched dialogues; Assess: one pass)
  and join the next decode stage (the Fuse decode, prefilled), or are done. Returns the
  ``(row, call)`` pairs that are done (answered, clarified or stopped);
- ``drop(rows)``: rows leave every decode at once (their control is cancelled; the trace says
  where they stopped) and are returned done.

So a long call no longer blocks a later one: the later call's rows decode alongside it from the
next step on. Exactness: every stage is row-independent (module docstring of
:mod:`taskmoe.inference.pipeline`), and a decode stage's session gives a row the inputs, config,
generator and side data the stage's ``__call__`` gives it, so a joined row's answer equals its
solo run (tested, greedy and seeded sampling). Not thread-safe: one thread drives a session.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from taskmoe.inference.stages.base import Call, Row, Stage
from taskmoe.inference.stages.joined import StageSession

__all__ = ["PipelineSession"]


class PipelineSession:
    """``stages`` (a :meth:`System.stages` list) with every stage that has ``open()`` run step-wise."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        self.sessions: dict[int, StageSession] = {i: st.open() for i, st in enumerate(self.stages)  # type: ignore[attr-defined]
                                                  if callable(getattr(st, "open", None))}
        self._where: dict[int, tuple[Row, Call, int]] = {}  # id(row) -> (row, call, stage index it is in)
        self._done: list[tuple[Row, Call]] = []
        self.steps = 0
        """Steps run so far (each one decode step of every decode stage)."""

    def __len__(self) -> int:
        """Rows added and not yet returned done."""
        return len(self._where)

    @torch.no_grad()
    def add(self, rows: list[Row], call: Call) -> None:
        """Join one call's rows (they are returned by a later :meth:`step` when done)."""
        for r in rows:
            self._where[id(r)] = (r, call, 0)
        self._advance(rows, call, 0)

    @torch.no_grad()
    def step(self) -> list[tuple[Row, Call]]:
        """One decode step of every decode stage; the rows done (module docstring)."""
        for i in sorted(self.sessions):
            by_call: dict[int, tuple[Call, list[Row]]] = {}
            for r, call in self.sessions[i].step():
                by_call.setdefault(id(call), (call, []))[1].append(r)
            for call, rows in by_call.values():
                self._advance(rows, call, i + 1)
        self.steps += 1
        return self._flush()

    def drop(self, rows: Sequence[Row]) -> list[tuple[Row, Call]]:
        """Stop ``rows`` now: out of every decode, done (their traces say where they stopped)."""
        rows = [r for r in rows if id(r) in self._where]
        finished = {id(r) for r, _ in self._done}  # done already: returned as they are
        at: dict[int, list[Row]] = defaultdict(list)
        for r in rows:
            if id(r) not in finished:
                at[self._where[id(r)][2]].append(r)
        for i, group in at.items():
            session = self.sessions.get(i)
            if session is not None:
                session.drop(group)
            for r in group:
                r.control.cancel()
                r.check(getattr(session, "stage_name", "") or self.stages[i].name)
        gone = {id(r) for r in rows}
        self._done = [(r, c) for r, c in self._done if id(r) not in gone]
        return [(r, self._where.pop(id(r))[1]) for r in rows]

    def _advance(self, rows: list[Row], call: Call, i: int) -> None:
        """Run ``rows`` from stage ``i`` on until they join a decode stage or are done."""
        while rows and i < len(self.stages):
            session = self.sessions.get(i)
            if session is None:
                rows = self.stages[i](rows, call)
            else:
                passed = session.add(rows, call)
                went_on = {id(r) for r in passed}
                for r in rows:
                    if id(r) not in went_on:
                        self._where[id(r)] = (r, call, i)
                rows = passed
            i += 1
        self._done += [(r, call) for r in rows]

    def _flush(self) -> list[tuple[Row, Call]]:
        done, self._done = self._done, []
        for r, _ in done:
            self._where.pop(id(r), None)
        return done
