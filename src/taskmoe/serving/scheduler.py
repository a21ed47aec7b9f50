"""Expert-grouped batching: a bounded queue of rows, one worker, generation in a thread.

Each prompt is routed once on arrival (``Backend.route``); its choices become *rows* that wait in
the queue grouped by ``Route.key``. One worker coroutine repeatedly picks a group and hands up
to ``max_batch`` of its rows to ``Backend.generate_batch`` in a dedicated thread, so every expert
a batch needs runs once per decoding step for all of them while the event loop keeps serving
HTTP (health checks, new arrivals, streaming out tokens).

Picking a group (design choices):

- a group that already holds ``max_batch`` rows runs at once (the one whose oldest row is oldest);
- otherwise the group holding the oldest row runs when that row has waited ``max_wait_ms`` --
  rows that arrive meanwhile with the same key join it. While a batch is generating new rows pile
  up, so under load batches fill themselves and ``max_wait_ms`` only matters when idle;
- the queue is bounded in rows (``queue_size``): :meth:`Scheduler.submit` raises
  :class:`QueueFull` rather than queueing without bound, and admits all rows of a request or none.

Cancellation: :meth:`Ticket.cancel` (client disconnect, timeout) removes a waiting row from the
queue, or makes the row's ``emit`` callback answer False so the backend halts it at the next
token. Each row also carries a deadline checked in ``emit``.

Text: every row owns a :class:`~taskmoe.serving.textstream.TextStream` fed inside ``emit`` (in
the generation thread), so a stop sequence halts the row on the token that completes it, and
streamed text deltas cross to the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Hashable, Mapping, Sequence

from taskmoe.errors import RequestError
from taskmoe.serving.backend import Backend, Route, Row, RowResult, SamplingParams
from taskmoe.serving.limits import Limits
from taskmoe.serving.metrics import ServerMetrics
from taskmoe.serving.textstream import TextStream

log = logging.getLogger("taskmoe.serving")


class QueueFull(RequestError):
    """The scheduler queue cannot take the rows of this request now (answer 429)."""

    def __init__(self, rows: int, waiting: int, capacity: int) -> None:
        super().__init__(f"server busy: {waiting} of {capacity} queue rows taken, request needs {rows}; retry later")


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
    """One row in flight: stream its text with :meth:`deltas`, await :meth:`result`, or :meth:`cancel`."""

    def __init__(self, scheduler: "Scheduler", route: Route, row_ids: list[int], params: SamplingParams,
                 stop: Sequence[str], deadline: float, stream: bool = True) -> None:
        self._scheduler = scheduler
        self._loop = scheduler.loop
        self.route = route
        decode = scheduler.backend.tokenizer.decode
        self.stream = TextStream(lambda ids: decode(ids, skip_special=True), stop)
        self.row = Row(list(row_ids), params, self._emit)
        self.deadline = deadline
        self.enqueued_at = time.monotonic()
        self.cancelled = threading.Event()
        self.timed_out = False
        self.streaming = stream
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()
        self._done: asyncio.Future[RowOutcome] = self._loop.create_future()

    # ---------------------------------------------------------------- called in the thread
    def _emit(self, token_id: int) -> bool:
        if self.cancelled.is_set():
            return False
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return False
        self._scheduler.metrics.completion_tokens.inc()
        delta = self.stream.push(token_id)
        if delta and self.streaming:
            self._loop.call_soon_threadsafe(self._deltas.put_nowait, delta)
        return not self.stream.stopped

    # ------------------------------------------------------------- called in the event loop
    def _resolve(self, result: RowResult | None, error: BaseException | None = None) -> None:
        if self._done.done():
            return
        if error is not None:
            self._deltas.put_nowait(None)
            self._done.set_exception(error)
            self._done.exception()  # mark retrieved: a cancelled reader may never await it
            return
        assert result is not None
        tail = self.stream.finish() if not (self.cancelled.is_set() or self.timed_out) else ""
        if tail and self.streaming:
            self._deltas.put_nowait(tail)
        self._deltas.put_nowait(None)
        if self.timed_out:
            finish = "timeout"
        elif self.cancelled.is_set():
            finish = "cancelled"
        elif result.finish == "length":
            finish = "length"
        else:  # "eos", or "halted" by a stop sequence
            finish = "stop"
        self._done.set_result(RowOutcome(self.stream.text, list(result.token_ids), finish, result.trace))

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces as they become safe to show; ends when the row is finished."""
        while True:
            piece = await self._deltas.get()
            if piece is None:
                return
            yield piece

    async def result(self) -> RowOutcome:
        return await asyncio.shield(self._done)

    def cancel(self, *, timeout: bool = False) -> None:
        """Stop this row (client gone, or ``timeout``): drop it from the queue, or halt it at its next token."""
        if self._done.done() or self.cancelled.is_set():
            return
        self.timed_out = self.timed_out or timeout
        self.cancelled.set()
        self._scheduler.metrics.cancelled.inc()
        if self._scheduler._remove(self):
            self._resolve(RowResult([], "halted"))


class Scheduler:
    """Bounded, key-grouped batching of rows in front of a :class:`Backend`.

    Use inside a running event loop: ``await start()``, then :meth:`submit`; ``await close()``.
    """

    def __init__(self, backend: Backend, limits: Limits | None = None, metrics: ServerMetrics | None = None) -> None:
        self.backend = backend
        self.limits = limits or Limits()
        self.metrics = metrics or ServerMetrics()
        self._groups: dict[Hashable, list[Ticket]] = {}
        self._waiting = 0
        self._running = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: list[Ticket] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batch_log: list[tuple[Hashable, int]] = []
        """(route key, rows) of every batch run, oldest first (the last 10,000)."""

    # ------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._worker is not None:
            return
        self.loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskmoe-generate")
        self._worker = asyncio.create_task(self._run(), name="taskmoe-scheduler")

    async def close(self) -> None:
        """Cancel everything waiting or running and stop the worker."""
        if self._worker is None:
            return
        for group in list(self._groups.values()):
            for t in list(group):
                t.cancel()
        for t in list(self._inflight):
            t.cancelled.set()
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        assert self._executor is not None
        await asyncio.get_running_loop().run_in_executor(None, lambda: self._executor.shutdown(wait=True))
        self._worker = None

    @property
    def waiting_rows(self) -> int:
        return self._waiting

    @property
    def running_rows(self) -> int:
        return self._running

    # ----------------------------------------------------------------------- admission
    def submit(
        self,
        route: Route,
        prompts: Sequence[tuple[list[int], SamplingParams]],
        stop: Sequence[str] = (),
        timeout_s: float | None = None,
        stream: bool = True,
    ) -> list[Ticket]:
        """Queue one row per (prompt_ids, params) under ``route``; all or none (:class:`QueueFull`).

        ``stream=False``: nobody reads :meth:`Ticket.deltas` (only the result), so text pieces are
        not handed to the event loop token by token."""
        if self._worker is None or self.loop is None:
            raise RuntimeError("Scheduler.submit before Scheduler.start")
        if self._waiting + len(prompts) > self.limits.queue_size:
            self.metrics.rejected.inc()
            raise QueueFull(len(prompts), self._waiting, self.limits.queue_size)
        deadline = time.monotonic() + (self.limits.generation_timeout_s if timeout_s is None else timeout_s)
        tickets = [Ticket(self, route, ids, params, stop, deadline, stream) for ids, params in prompts]
        self._groups.setdefault(route.key, []).extend(tickets)
        self._waiting += len(tickets)
        self.metrics.queue_rows.set(self._waiting)
        assert self._wakeup is not None
        self._wakeup.set()
        return tickets

    def _remove(self, ticket: Ticket) -> bool:
        group = self._groups.get(ticket.route.key)
        if group is None or ticket not in group:
            return False
        group.remove(ticket)
        if not group:
            del self._groups[ticket.route.key]
        self._waiting -= 1
        self.metrics.queue_rows.set(self._waiting)
        return True

    # -------------------------------------------------------------------------- worker
    def _pick(self) -> tuple[Hashable | None, float]:
        """The key to run now (or None) and, if None, how long until the oldest row's wait ends."""
        full = [(g[0].enqueued_at, k) for k, g in self._groups.items() if len(g) >= self.limits.max_batch]
        if full:
            return min(full, key=lambda x: x[0])[1], 0.0
        oldest_at, key = min(((g[0].enqueued_at, k) for k, g in self._groups.items()), key=lambda x: x[0])
        remaining = oldest_at + self.limits.max_wait_ms / 1000.0 - time.monotonic()
        return (key, 0.0) if remaining <= 0 else (None, remaining)

    async def _next_batch(self) -> tuple[Route, list[Ticket]]:
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            if not self._groups:
                await self._wakeup.wait()
                continue
            key, remaining = self._pick()
            if key is None:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
                continue
            group = self._groups[key]
            batch, rest = group[: self.limits.max_batch], group[self.limits.max_batch :]
            if rest:
                self._groups[key] = rest
            else:
                del self._groups[key]
            self._waiting -= len(batch)
            self.metrics.queue_rows.set(self._waiting)
            return batch[0].route, batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            route, batch = await self._next_batch()
            now = time.monotonic()
            for t in batch:
                self.metrics.queue_wait.observe(now - t.enqueued_at)
            self._inflight = batch
            self._running = len(batch)
            self.metrics.running_rows.set(self._running)
            self.metrics.batches.inc()
            self.metrics.batch_rows.observe(len(batch))
            self.batch_log.append((route.key, len(batch)))
            del self.batch_log[:-10_000]
            try:
                results = await loop.run_in_executor(
                    self._executor, self.backend.generate_batch, route, [t.row for t in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(batch)} rows")
            except asyncio.CancelledError:
                for t in batch:
                    t.cancelled.set()
                    t._resolve(None, RuntimeError("server shutting down"))
                raise
            except Exception as e:  # a backend failure fails its batch, not the server
                log.exception("generate_batch failed for route %r", route.key)
                for t in batch:
                    t._resolve(None, e)
            else:
                for t, r in zip(batch, results):
                    t._resolve(r)
            finally:
                self._inflight = []
                self._running = 0
                self.metrics.running_rows.set(0)
