"""One row in flight: :class:`Ticket` (what the HTTP layer holds) and :class:`RowOutcome` (its end).

A ticket owns its row's :class:`~taskmoe.serving.textstream.TextStream`, fed inside ``emit`` in
the generation thread, so a stop sequence halts the row on the token that completes it; text
pieces cross to the event loop with ``call_soon_threadsafe`` into the request's ``sink`` queue as
``(index, piece)`` and ``(index, None)`` when the row ends (one queue per request, no task per row).

A row is **alive** until it is cancelled (client gone) or its deadline passes; ``emit`` answers
False for a dead row and the scheduler drops dead rows before the next step, so a row nobody waits
for costs at most the one forward already running. ``done`` is resolved once, in the event loop;
its exception (a backend failure) is marked retrieved, so an abandoned ticket never logs
"exception was never retrieved".

Work accounting for admission: ``cost`` = prompt tokens + ``max_tokens`` work tokens, of which
the prompt is done once prefilled and one token per token generated (the scheduler's backlog is
the sum of what is left); ``rounds`` counts the decode rounds the row was stepped in (the
scheduler's generation thread adds them), and :meth:`Ticket.work` is the row as the cost
model predicts it (:class:`~taskmoe.serving.costs.RowWork`). A row that ends normally reports
its rounds per answer token to the cost model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from taskmoe.serving.backend import Route, Row, RowResult, SamplingParams
from taskmoe.serving.costs import RowWork
from taskmoe.serving.textstream import TextStream

if TYPE_CHECKING:
    from taskmoe.serving.scheduler import Scheduler

__all__ = ["RowOutcome", "Ticket"]


@dataclass
class RowOutcome:
    """A finished row as the HTTP layer needs it.

    ``finish``: ``"stop"`` (end token or stop sequence), ``"length"`` (max_tokens),
    ``"cancelled"`` (the client went away) or ``"timeout"`` (the deadline passed).
    """

    text: str
    token_ids: list[int]
    finish: str
    trace: Mapping[str, Any] | None


class Ticket:
    """One row: await :attr:`done` (or :meth:`result`), read pieces from ``sink``, or :meth:`cancel`."""

    def __init__(self, scheduler: "Scheduler", route: Route, row_ids: list[int], params: SamplingParams,
                 stop: Sequence[str], deadline: float, *, sink: asyncio.Queue | None = None, index: int = 0) -> None:
        self._scheduler = scheduler
        self._loop = scheduler.loop
        self.route = route
        decode = scheduler.backend.tokenizer.decode
        self.stream = TextStream(lambda ids: decode(ids, skip_special=True), stop)
        self.row = Row(list(row_ids), params, self._emit, self.alive)
        self.deadline = deadline
        self.enqueued_at = time.monotonic()
        self.cancelled = threading.Event()
        self.timed_out = False
        self.sink, self.index = sink, index
        self.cost = len(row_ids) + params.max_tokens
        self.prefilled = False
        self.generated = 0
        self.rounds = 0
        self.done: asyncio.Future[RowOutcome] = self._loop.create_future()

    @property
    def remaining(self) -> int:
        """Work tokens still reserved by this row."""
        return max(0, self.cost - self.generated - (len(self.row.prompt_ids) if self.prefilled else 0))

    def work(self, now: float) -> RowWork:
        """This row for the cost model: what is left to prefill, its rounds so far, time to its deadline."""
        return RowWork(self.route.key, 0 if self.prefilled else len(self.row.prompt_ids), self.row.params.max_tokens,
                       self.rounds, self.deadline - now)

    def alive(self) -> bool:
        """False once the row was cancelled or its deadline passed (then it is also marked timed out)."""
        if self.cancelled.is_set():
            return False
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return False
        return True

    # ---------------------------------------------------------------- called in the thread
    def _emit(self, token_id: int) -> bool:
        if not self.alive():
            return False
        self.generated += 1
        self._scheduler.generated_tokens += 1
        self._scheduler.metrics.completion_tokens.inc()
        delta = self.stream.push(token_id)
        if delta and self.sink is not None:
            self._loop.call_soon_threadsafe(self.sink.put_nowait, (self.index, delta))
        return not self.stream.stopped

    # ------------------------------------------------------------- called in the event loop
    def resolve(self, result: RowResult | None, error: BaseException | None = None) -> None:
        """End the row with the backend's ``result`` (or ``error``); idempotent."""
        if self.done.done():
            return
        self._scheduler._finished(self)
        if error is not None:
            self._put(None)
            self.done.set_exception(error)
            self.done.exception()  # mark retrieved: a reader that went away never awaits it
            return
        assert result is not None
        dead = self.cancelled.is_set() or self.timed_out
        tail = "" if dead else self.stream.finish()
        if tail:
            self._put(tail)
        self._put(None)
        if self.timed_out:
            finish = "timeout"
        elif self.cancelled.is_set():
            finish = "cancelled"
        elif result.finish == "length":
            finish = "length"
        else:  # "eos", or "halted" by a stop sequence
            finish = "stop"
        if finish in ("stop", "length"):
            self._scheduler.admission.costs.observe_row(self.rounds, self.generated)
        self.done.set_result(RowOutcome(self.stream.text, list(result.token_ids), finish, result.trace))

    def _put(self, piece: str | None) -> None:
        if self.sink is not None:
            self.sink.put_nowait((self.index, piece))

    async def result(self) -> RowOutcome:
        return await asyncio.shield(self.done)

    def cancel(self, *, timeout: bool = False) -> None:
        """Stop this row (client gone, or ``timeout``): drop it from the queue, or halt it before its next step."""
        if self.done.done() or self.cancelled.is_set():
            return
        self.timed_out = self.timed_out or timeout
        self.cancelled.set()
        self._scheduler.metrics.cancelled.inc()
        if self._scheduler._remove(self):
            self.resolve(RowResult([], "halted"))
        else:
            self._scheduler.wake()
