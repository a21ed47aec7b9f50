"""What the step-wise decode stages share: rows of many calls decoding together in
:class:`~taskmoe.inference.session.DecodeSession` s, joining between steps.

A decode stage (Draft, Fuse, Ensemble) answers ``stage.open() -> StageSession``; the session
takes rows with ``add(rows, call) -> rows passed through`` (rows it has no work for go straight on)
and ``step() -> [(row, call)]`` (the rows whose stage work ended in this step), and ``drop(rows)``
takes rows out at once. A stage's session builds each row's decode from the same methods its
``__call__`` uses (``inputs``, ``decoder``), so the two paths cannot drift apart.
:class:`~taskmoe.inference.stages.session.PipelineSession` composes them.

:class:`JoinedDecode` is the machinery behind each: one :class:`DecodeSession` per **model key**
(an expert's name and the model object the store handed out; the summarizer's adapter; an expert set), each
row decoded under a handle that remembers its pipeline :class:`Row`, its :class:`Call` (the call it
came with: its clock, token callback, store view) and a stage-specific tag (e.g. the drafting
expert). A step runs ONE decode step of every session; its wall time is added to the clock of
every call whose rows took part, under the stage's timing name (``drafts``, ``summarize``,
``ensemble``), so a row's trace timings say how long its call spent in each stage.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Protocol, Sequence

from torch import nn

from taskmoe.inference.generate import GenerationConfig, RowOutput
from taskmoe.inference.session import DecodeSession
from taskmoe.inference.stages.base import Call, Row

__all__ = ["StageSession", "JoinedDecode", "AnswerDecode"]


class StageSession(Protocol):
    """A decode stage opened for continuous batching (module docstring)."""

    def __len__(self) -> int: ...

    def add(self, rows: list[Row], call: Call) -> list[Row]: ...

    def step(self) -> list[tuple[Row, Call]]: ...

    def drop(self, rows: Sequence[Row]) -> None: ...


class JoinedDecode:
    """Sessions by model key, handles by row (module docstring). Subclasses set :attr:`timing`."""

    timing = ""
    stage_name = ""
    """The stage a row that is dropped here is recorded as stopped in (``trace.stopped``)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self._sessions: dict[Hashable, DecodeSession] = {}
        self._rows: dict[Hashable, dict[int, tuple[Row, Call, Any]]] = {}  # key -> handle -> (row, call, tag)

    @property
    def decoding(self) -> int:
        """Row decodes in flight (a row drafting with two experts counts twice)."""
        return sum(len(v) for v in self._rows.values())

    def _decode(self, key: Hashable, model: Callable[[], nn.Module], rows: Sequence[Row], call: Call,
                prompts: Sequence[Sequence[int]], cfgs: Sequence[GenerationConfig], tags: Sequence[Any], *,
                stage: str, expert: str | None = None, side: Sequence[Any] | None = None) -> None:
        """Join ``rows`` (their ``prompts`` under ``cfgs``) to the session of ``key`` (built from
        ``model()`` when none runs); every token streams as ``stage`` and checks the row's control."""
        if not rows:
            return
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = DecodeSession(model())
        t0 = time.perf_counter()
        handles = session.add(prompts, cfgs, emits=[call.emit(r, stage, expert) for r in rows], side=side)
        call.clock.add(self.timing, time.perf_counter() - t0)
        owners = self._rows.setdefault(key, {})
        for h, r, tag in zip(handles, rows, tags):
            owners[h] = (r, call, tag)

    def _step(self) -> list[tuple[Row, Call, Any, RowOutput]]:
        """One decode step of every session: ``(row, call, tag, output)`` of the decodes that ended."""
        ended: list[tuple[Row, Call, Any, RowOutput]] = []
        for key, session in list(self._sessions.items()):
            owners = self._rows[key]
            calls = {id(c): c for _r, c, _t in owners.values()}
            t0 = time.perf_counter()
            done = session.step()
            dt = time.perf_counter() - t0
            for c in calls.values():
                c.clock.add(self.timing, dt)
            ended += [(*owners.pop(h), out) for h, out in done]
            self._tidy(key)
        return ended

    def _drop(self, rows: Sequence[Row]) -> list[tuple[Row, Call, Any, RowOutput]]:
        """Take every decode of ``rows`` out now: ``(row, call, tag, output)`` (finish ``"halted"``)."""
        ids = {id(r) for r in rows}
        out: list[tuple[Row, Call, Any, RowOutput]] = []
        for key, session in list(self._sessions.items()):
            owners = self._rows[key]
            out += [(*owners.pop(h), o) for h, o in session.drop([h for h, (r, _c, _t) in owners.items() if id(r) in ids])]
            self._tidy(key)
        return out

    def _tidy(self, key: Hashable) -> None:
        if not len(self._sessions[key]):
            del self._sessions[key], self._rows[key]


class AnswerDecode(JoinedDecode):
    """A decode that writes the answer (Fuse, Ensemble): a row is done when its one decode ends."""

    stage_name = "answer"

    def __len__(self) -> int:
        return self.decoding

    def step(self) -> list[tuple[Row, Call]]:
        done = []
        for r, call, _tag, out in self._step():
            r.answer = out.tokens
            done.append((r, call))
        return done

    def drop(self, rows: Sequence[Row]) -> None:
        for r, _call, _tag, out in self._drop(rows):
            r.answer = out.tokens
