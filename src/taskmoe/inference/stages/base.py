"""What every pipeline stage shares: the :class:`Row` it reads and writes, the per-row :class:`Control`,
and the per-call :class:`Call` (settings, expert store as seen by this call, clock, token callback).

The stage contract (STYLE.md 16): ``stage(rows, call) -> rows``: a list of rows in, the same rows
(same objects, same order) out, with the stage's results and trace entries written into them.
A stage works on the whole list at once (one routing pass, one decode per expert or per group),
never one prompt at a time, and leaves alone every row that is no longer :attr:`Row.live`
(stopped, or answered by a clarification).

Stopping: before a stage touches a row, and after every token a row produces (``Call.emit``), the
row's :class:`Control` is asked whether to stop (cancelled, or past its deadline). A row that
stops keeps what it produced so far, records the reason and the stage in its trace
(``trace.stopped``), leaves the batch before the next decode step, and no later stage runs it.

Streaming: ``on_token(row, token, stage, expert)`` is called for every token as it is produced:
``stage`` is ``"draft"`` and ``"crosstalk"`` (``expert`` names the speaker), ``"answer"`` (the
summarizer's or the ensemble's answer; ``expert`` None) and ``"clarification"`` (the tokens of a
clarification question, written at once; ``expert`` None). ``row`` is the prompt's index in the
call.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

from torch import nn

from taskmoe.experts.store import ExpertStore
from taskmoe.inference.trace import Trace
from taskmoe.router.policy import RoutingDecision
from taskmoe.summarizer.disagreement import DisagreementReport
from taskmoe.summarizer.fuser import Draft
from taskmoe.summarizer.intent import IntentResult

__all__ = ["Control", "Row", "Call", "Stage", "ExpertStage", "OnToken", "STAGES", "Clock", "RecordingStore"]

OnToken = Callable[[int, int, str, "str | None"], None]
"""``on_token(row, token, stage, expert)``: see the module docstring."""

STAGES = ("draft", "crosstalk", "answer", "clarification")
"""The ``stage`` values ``on_token`` receives."""


@dataclass
class Control:
    """When one row's work must stop: :meth:`cancel` (or an external ``is_cancelled()``) and a deadline.

    ``deadline`` is a :func:`time.monotonic` time in seconds (None: none). Checked before every
    stage and after every decode step of the row; thread-safe to :meth:`cancel` from another thread
    (a plain attribute write).
    """

    deadline: float | None = None
    is_cancelled: Callable[[], bool] | None = None
    _cancelled: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled or (self.is_cancelled is not None and bool(self.is_cancelled()))

    def reason(self) -> str | None:
        """``"cancelled"``, ``"deadline"`` or None (go on)."""
        if self.cancelled():
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return None


@dataclass
class Row:
    """One prompt travelling through the stages, with everything decided about it so far.

    Side data the decoders need per row lives here and is handed to them with the row (never
    looked up by prompt): ``decision.weights`` (ensemble mixture), ``adapter`` (the summarizer's
    LoRA adapter for this row), each draft's ``expert``.
    """

    index: int
    prompt: list[int]
    cfg: Any  # the row's PipelineConfig (the call's settings with this row's overrides)
    trace: Trace
    control: Control = field(default_factory=Control)
    decision: RoutingDecision | None = None
    drafts: list[Draft] = field(default_factory=list)
    intent: IntentResult | None = None
    intent_probs: Any = None  # the prompt's intent probabilities (K,), reused by the assessment
    report: DisagreementReport | None = None
    adapter: str | None = None
    answer: list[int] = field(default_factory=list)
    stopped: str | None = None

    @property
    def live(self) -> bool:
        """Still to be worked on: not stopped and not answered by a clarification."""
        return self.stopped is None and not self.trace.clarify

    def check(self, stage: str) -> bool:
        """True when the row must stop now (recorded once, with the stage, in the trace)."""
        if self.stopped is None:
            reason = self.control.reason()
            if reason is not None:
                self.stopped = reason
                self.trace.stopped = {"reason": reason, "stage": stage}
        return self.stopped is not None


class Clock:
    """Seconds per named stage, summed over the call."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        self.t[stage] = self.t.get(stage, 0.0) + seconds


class RecordingStore:
    """The expert store as seen by one call: records whether each expert was loaded now or cached."""

    def __init__(self, store: ExpertStore) -> None:
        self.store = store
        self.uses: dict[str, tuple[str, float]] = {}

    @property
    def names(self) -> list[str]:
        return self.store.names

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def get(self, name: str) -> nn.Module:
        resident = self.store.is_resident(name)
        t0 = time.perf_counter()
        model = self.store.get(name)
        if name not in self.uses:
            self.uses[name] = ("cached", 0.0) if resident else ("loaded", time.perf_counter() - t0)
        return model


@dataclass
class Call:
    """What one ``generate_ids`` call shares across its rows."""

    cfg: Any  # the call's PipelineConfig (batch sizes, adapter name: settings that are not per row)
    store: RecordingStore
    clock: Clock = field(default_factory=Clock)
    on_token: OnToken | None = None
    size: int | None = None
    """How many rows the call brought (the traces' ``batch_size``; None: the rows passed together)."""

    def emit(self, row: Row, stage: str, expert: str | None = None) -> Callable[[int], bool]:
        """The per-token callback of ``row`` in a decoder: stream the token, then say whether to go on."""

        def call(token: int) -> bool:
            if self.on_token is not None:
                self.on_token(row.index, int(token), stage, expert)
            return not row.check(stage)

        return call

    def live(self, rows: list[Row], stage: str) -> list[Row]:
        """The rows a stage should work on (checking each row's control first)."""
        return [r for r in rows if r.live and not r.check(stage)]


class Stage(Protocol):
    """``stage(rows, call) -> rows`` (module docstring)."""

    name: str

    def __call__(self, rows: list[Row], call: Call) -> list[Row]: ...


class ExpertStage:
    """What the stages that act through the experts share (Draft, Crosstalk, Ensemble): ``expert_of``
    maps a router category to its expert's name; ``tokenizer`` is the system's."""

    name = ""

    def __init__(self, expert_of: Mapping[str, str], tokenizer: Any) -> None:
        self.expert_of = dict(expert_of)
        self.tokenizer = tokenizer

    def crosstalk_entry(self, d: RoutingDecision) -> dict[str, Any]:
        """The trace entry of a decision's flagged pair before any dialogue runs: the two experts
        (``pair``), their ``categories``, the ``joined`` ones, ``ran`` False, no ``turns``."""
        assert d.crosstalk is not None
        cats = [d.categories[i] for i in d.crosstalk]
        return {"pair": [self.expert_of[c] for c in cats], "categories": cats,
                "joined": [d.categories[i] for i in d.joined], "ran": False, "turns": []}
