"""Continuous, expert-grouped batching with admission by work and cancellation within one step.

Each prompt is routed once on arrival (``Backend.route``); its choices become *rows*
(:class:`~taskmoe.serving.tickets.Ticket`) that wait grouped by ``Route.key``. One worker coroutine
plans, hands the plan to a dedicated generation thread (the event loop keeps serving HTTP), and
settles the results. Two ways to run, picked from the backend:

- **Stepwise** (the backend has ``open_batch``: LM, DOE and IMoE backends; an IMoE step is one
  decode step of every decode stage of the pipeline). Every routing key has at
  most one running :class:`~taskmoe.serving.backend.StepBatch`; each plan (1) drops the rows that
  died (client gone, deadline passed), (2) lets waiting rows **join** a running batch of their key
  between steps, up to ``max_batch`` rows (a key with no running batch starts once its oldest row
  waited ``max_wait_ms`` or the group is full), and (3) runs **one decode step of every running
  batch**, round robin. So many requests are in flight, a long request never blocks a short one
  of another key, and a dead row costs at most the forward that was already running.
  ``batching="fifo"`` (the benchmark's baseline) caps running rows at ``max_batch`` over all keys
  and lets rows start strictly in arrival order, i.e. batching without grouping by expert.
- **Whole batch** (a backend with only ``generate_batch``): the group with a full batch, or
  holding the oldest row once it waited ``max_wait_ms``, runs to the end in one call; rows check
  ``alive()`` and ``emit`` halts them.

Admission (:meth:`Scheduler.submit`, all rows of a request or none): a component the route needs
that failed answers :class:`~taskmoe.serving.backend.ComponentUnavailable` (503); more waiting
rows than ``queue_size`` or more work than :class:`~taskmoe.serving.admission.Admission` allows
answers :class:`~taskmoe.serving.admission.Refused` (429 with ``Retry-After``). The rates the rule
predicts with (:class:`~taskmoe.serving.costs.CostModel`) are measured here, in the generation
thread: every ``add`` (a join: its prompts are prefilled) is one prefill sample of its key (rows,
prompt tokens, seconds), every batch step one decode sample of its key (rows, seconds), so a
prompt-heavy join never makes decoding look fast; a whole-batch call is one decode sample of (its
longest row's tokens as steps, all rows' tokens as row steps, seconds).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

from taskmoe.serving.admission import Admission, Refused, RowWork, request_cost
from taskmoe.serving.backend import Backend, ComponentUnavailable, Route, RowResult, SamplingParams, StepBatch
from taskmoe.serving.costs import CostModel
from taskmoe.serving.limits import Limits
from taskmoe.serving.metrics import ServerMetrics
from taskmoe.serving.tickets import RowOutcome, Ticket
from taskmoe.serving.waiting import Plan, Planner

log = logging.getLogger("taskmoe.serving")

__all__ = ["Scheduler", "Ticket", "RowOutcome", "Refused"]

SLICE_S = 0.05
"""Longest the generation thread decodes without handing back to the planner (new rows join then)."""


@dataclass
class _Running:
    """A running step batch of one key: its rows by handle."""

    route: Route
    batch: StepBatch
    rows: dict[int, Ticket] = field(default_factory=dict)


class Scheduler:
    """Batching of rows in front of a :class:`Backend` (see the module docstring).

    Use inside a running event loop: ``await start()``, then :meth:`submit`; ``await close()``.
    """

    def __init__(self, backend: Backend, limits: Limits | None = None, metrics: ServerMetrics | None = None) -> None:
        self.backend = backend
        self.limits = limits or Limits()
        self.metrics = metrics or ServerMetrics()
        self.admission = Admission(self.limits)
        self.stepwise = callable(getattr(backend, "open_batch", None))
        self.failed: dict[str, str] = {}
        """Components that failed while serving -> why (answered 503, listed by /health)."""
        self.planner = Planner(self.limits, self.metrics)
        self._queue = self.planner.queue
        self._running: dict[Hashable, _Running] = {}
        self._live: set[Ticket] = set()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._whole: list[Ticket] = []
        self._changed = threading.Event()  # set by submit/cancel: the decode slice hands back to the planner
        self.generated_tokens = 0
        """Tokens generated so far (counted by the tickets, in the generation thread)."""
        self.loop: asyncio.AbstractEventLoop | None = None

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
        for t in list(self._live):
            t.cancelled.set()
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        for t in list(self._live):
            t.resolve(None, RuntimeError("server shutting down"))
        assert self._executor is not None
        await asyncio.get_running_loop().run_in_executor(None, lambda: self._executor.shutdown(wait=True))
        self._worker = None

    @property
    def batch_log(self) -> list[tuple[Hashable, int]]:
        """(route key, rows) of every group that started together, oldest first (the last 10,000)."""
        return self.planner.batch_log

    @property
    def waiting_rows(self) -> int:
        return len(self._queue)

    @property
    def running_rows(self) -> int:
        return sum(len(r.rows) for r in self._running.values()) + len(self._whole)

    @property
    def backlog(self) -> int:
        """Work tokens admitted and not yet done (see :mod:`taskmoe.serving.admission`)."""
        return sum(t.remaining for t in self._live)

    def wake(self) -> None:
        self._changed.set()
        if self._wakeup is not None:
            self._wakeup.set()

    # ----------------------------------------------------------------------- admission
    def admit(self, routes: Sequence[Route], prompts: Sequence[Sequence[int]], n: int, max_tokens: int) -> None:
        """Raise (503 / 429) unless a request of these prompts (``n`` rows each) may start now."""
        needs = getattr(self.backend, "components", None)
        for c in [c for r in routes for c in (needs(r) if needs is not None else [])]:
            if c in self.failed:  # a component the request needs failed: 503 before any work
                raise ComponentUnavailable(c, self.failed[c])
        rows = len(prompts) * n
        if len(self._queue) + rows > self.limits.queue_size:
            self.metrics.rejected.inc()
            raise Refused(f"server busy: {len(self._queue)} of {self.limits.queue_size} queue rows taken, request needs "
                          f"{rows}; retry later", code="queue_full", retry_after=self.limits.retry_after_s)
        now = time.monotonic()
        keys = [r.key for r in routes] if routes else [None] * len(prompts)  # None: not routed yet
        request = [RowWork(k, len(p), max_tokens, 0, self.limits.generation_timeout_s)
                   for k, p in zip(keys, prompts) for _ in range(n)]
        try:
            self.admission.check(request_cost([len(p) for p in prompts], n, max_tokens), self.backlog,
                                 [t.work(now) for t in self._live], request)
        except Refused:
            self.metrics.rejected.inc()
            raise

    def submit(self, route: Route, prompts: Sequence[tuple[list[int], SamplingParams]], stop: Sequence[str] = (),
               timeout_s: float | None = None, *, sink: asyncio.Queue | None = None, first_index: int = 0) -> list[Ticket]:
        """Queue one row per (prompt_ids, params) under ``route`` (call :meth:`admit` first).

        ``sink``: the request's queue of ``(index, text piece | None)`` for streaming (rows are
        numbered from ``first_index``); without it only the results are kept."""
        if self._worker is None or self.loop is None:
            raise RuntimeError("Scheduler.submit before Scheduler.start")
        deadline = time.monotonic() + (self.limits.generation_timeout_s if timeout_s is None else timeout_s)
        tickets = [Ticket(self, route, ids, p, stop, deadline, sink=sink, index=first_index + i)
                   for i, (ids, p) in enumerate(prompts)]
        self._queue.add(tickets)
        self._live.update(tickets)
        self._gauges()
        self.wake()
        return tickets

    def _remove(self, ticket: Ticket) -> bool:
        removed = self._queue.remove(ticket)
        if removed:
            self._gauges()
        return removed

    def _finished(self, ticket: Ticket) -> None:
        self._live.discard(ticket)

    def _gauges(self) -> None:
        self.metrics.queue_rows.set(len(self._queue))
        self.metrics.running_rows.set(self.running_rows)
        self.metrics.backlog_tokens.set(self.backlog)
        self.metrics.backlog_seconds.set(self.backlog_s or 0.0)

    @property
    def backlog_s(self) -> float | None:
        """Predicted seconds until every live row is done (None before a decode step was timed)."""
        if not self.admission.costs.measured:
            return None
        now = time.monotonic()
        return self.admission.costs.predict([t.work(now) for t in self._live])

    # ---------------------------------------------------------------------------- worker
    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            self._changed.clear()
            try:
                await self._iteration(asyncio.get_running_loop())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must fail its rows, never leave them waiting forever
                log.error("scheduler iteration failed: %s: %s", type(e).__name__, e)
                self._running.clear()
                _fail_rows(self.failed, None, [t for t in self._live if t not in set(self._queue)], e)

    async def _iteration(self, loop: asyncio.AbstractEventLoop) -> None:
        """Plan, run the plan in the generation thread, settle (see the module docstring)."""
        plan = self.planner.steps(self._running, self.running_rows) if self.stepwise else self.planner.whole()
        if not (plan.drops or plan.joins or plan.whole or self._running):
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._queue.until_ripe())  # type: ignore[union-attr]
            except asyncio.TimeoutError:
                pass
            return
        for key, tickets in plan.joins:
            if key not in self._running:
                self._running[key] = _Running(tickets[0].route, self.backend.open_batch(tickets[0].route))
        self._whole = plan.whole[1] if plan.whole else []
        self._gauges()
        t0, work0 = time.monotonic(), self.generated_tokens
        try:
            if plan.whole:
                await _run_whole(self, loop, *plan.whole)
            else:
                await self._run_steps(loop, plan)
        finally:
            self._whole = []
            self._gauges()
        self.admission.observe(self.generated_tokens - work0 + plan.prompt_tokens, time.monotonic() - t0)
        self.metrics.decode_rate.set(self.admission.throughput or 0.0)

    async def _run_steps(self, loop: asyncio.AbstractEventLoop, plan: Plan) -> None:
        running = list(self._running.values())
        joins = [(self._running[k], ts) for k, ts in plan.joins]
        drops = [(self._running[k], hs) for k, hs in plan.drops]

        def post(run: _Running, results: list[tuple[int, RowResult]]) -> None:
            loop.call_soon_threadsafe(_settle, run, results)

        errors = await loop.run_in_executor(self._executor, _decode_slice, running, joins, drops, self._changed,
                                            post, self.metrics, self.admission.costs)
        for key, run in list(self._running.items()):
            if id(run) in errors:  # a failed batch fails its rows and is discarded (its state is not trusted)
                _fail_rows(self.failed, run.route, list(run.rows.values()), errors[id(run)])
                del self._running[key]
            elif not len(run.batch) and not run.rows:
                del self._running[key]


async def _run_whole(sched: Scheduler, loop: asyncio.AbstractEventLoop, route: Route, batch: list[Ticket]) -> None:
    """A backend without step-wise batches: one ``generate_batch`` call for ``batch`` in the generation thread."""
    try:
        t0 = time.monotonic()
        results = await loop.run_in_executor(sched._executor, sched.backend.generate_batch, route, [t.row for t in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"backend returned {len(results)} results for {len(batch)} rows")
        lengths = [len(r.token_ids) for r in results]
        sched.admission.costs.observe_step(route.key, sum(lengths), time.monotonic() - t0, max(lengths, default=0))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a backend failure fails its batch, not the server
        _fail_rows(sched.failed, route, batch, e)
    else:
        for t, r in zip(batch, results):
            t.resolve(r)


def _fail_rows(failed: dict[str, str], route: Route | None, tickets: list[Ticket], error: BaseException) -> None:
    """Fail ``tickets`` with ``error``; a :class:`ComponentUnavailable` is remembered in ``failed`` (503 later)."""
    key = route.key if route is not None else None
    if isinstance(error, ComponentUnavailable):
        failed[error.component] = error.reason
        log.error("%s (route %r): answering 503 for requests that need it", error, key)
    elif route is not None:
        log.error("generation failed for route %r: %s: %s", key, type(error).__name__, error)
    for t in tickets:
        t.resolve(None, error)


def _settle(run: _Running, results: list[tuple[int, RowResult]]) -> None:
    """In the event loop: resolve the tickets of rows that ended."""
    for h, r in results:
        t = run.rows.pop(h, None)
        if t is not None:
            t.resolve(r)


def _decode_slice(running: list[_Running], joins: list[tuple[_Running, list[Ticket]]],
                  drops: list[tuple[_Running, list[int]]], changed: threading.Event, post: Callable,
                  metrics: ServerMetrics, costs: CostModel) -> dict[int, BaseException]:
    """In the generation thread: drop dead rows, join new ones, then decode rounds of every batch.

    Rounds go on (each one step of every batch, round robin) until something changed for the
    planner (a request arrived or was cancelled), every batch is empty, or :data:`SLICE_S` passed;
    rows that end are posted to the event loop at once, and a row that died (client gone,
    deadline) is dropped before the next step. Each join is timed as a prefill sample and each
    batch step as a decode sample for ``costs``. Returns ``{id(run): error}``: a failing batch fails alone."""
    errors: dict[int, BaseException] = {}
    for run, handles in drops:
        post(run, run.batch.drop(handles))
    for run, tickets in joins:
        try:
            t0 = time.monotonic()
            for h, t in zip(run.batch.add([t.row for t in tickets]), tickets):
                run.rows[h] = t
            costs.observe_prefill(run.route.key, len(tickets), sum(len(t.row.prompt_ids) for t in tickets),
                                  time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - reported per batch
            errors[id(run)] = e
            run.rows.update({-1 - i: t for i, t in enumerate(tickets)})
    end = time.monotonic() + SLICE_S
    while True:
        for run in running:
            if id(run) in errors or not len(run.batch):
                continue
            t0 = time.monotonic()
            dead = [h for h, t in list(run.rows.items()) if not t.alive()]
            if dead:
                post(run, run.batch.drop(dead))
            if not (rows := len(run.batch)):
                continue
            for t in list(run.rows.values()):
                t.rounds += 1
            try:
                post(run, run.batch.step())
            except Exception as e:  # noqa: BLE001
                errors[id(run)] = e
            else:
                costs.observe_step(run.route.key, rows, time.monotonic() - t0)
        metrics.steps.inc()
        live = any(len(r.batch) for r in running if id(r) not in errors)
        if not live or changed.is_set() or time.monotonic() >= end:
            return errors
