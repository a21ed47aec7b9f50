"""Continuous, expert-grouped batching with admission by work and cancellation within one step.

Each prompt is routed once on arrival (``Backend.route``); its choices become *rows*
(:class:`~taskmoe.serving.tickets.Ticket`) that wait grouped by ``Route.key``. One worker coroutine
plans, hands the plan to a dedicated generation thread (the event loop keeps serving HTTP), and
settles the results. Two ways to run, picked from the backend:

- **Stepwise** (the backend has ``open_batch``: LM and DOE backends). Every routing key has at
  most one running :class:`~taskmoe.serving.backend.StepBatch`; each plan (1) drops the rows that
  died (client gone, deadline passed), (2) lets waiting rows **join** a running batch of their key
  between steps, up to ``max_batch`` rows (a key with no running batch starts once its oldest row
  waited ``max_wait_ms`` or the group is full), and (3) runs **one decode step of every running
  batch**, round robin. So many requests are in flight, a long request never blocks a short one
  of another key, and a dead row costs at most the forward that was already running.
  ``batching="fifo"`` (the benchmark's baseline) caps running rows at ``max_batch`` over all keys
  and lets rows start strictly in arrival order, i.e. batching without grouping by expert.
- **Whole batch** (only ``generate_batch``: the IMoE system): the group with a full batch, or
  holding the oldest row once it waited ``max_wait_ms``, runs to the end in one call; rows check
  ``alive()`` and ``emit`` halts them.

Admission (:meth:`Scheduler.submit`, all rows of a request or none): a component the route needs
that failed answers :class:`~taskmoe.serving.backend.ComponentUnavailable` (503); more waiting
rows than ``queue_size`` or more work than :class:`~taskmoe.serving.admission.Admission` allows
answers :class:`~taskmoe.serving.admission.Refused` (429 with ``Retry-After``). The rate the rule
uses is measured here: work tokens (prefilled prompts + generated tokens) per second of each plan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from taskmoe.serving.admission import Admission, Refused, request_cost
from taskmoe.serving.backend import Backend, ComponentUnavailable, Route, RowResult, SamplingParams, StepBatch
from taskmoe.serving.limits import Limits
from taskmoe.serving.metrics import ServerMetrics
from taskmoe.serving.tickets import RowOutcome, Ticket

log = logging.getLogger("taskmoe.serving")

__all__ = ["Scheduler", "Ticket", "RowOutcome", "Refused"]


@dataclass
class _Running:
    """A running step batch of one key: its rows by handle."""

    route: Route
    batch: StepBatch
    rows: dict[int, Ticket] = field(default_factory=dict)


@dataclass
class _Plan:
    drops: list[tuple[Hashable, list[int]]] = field(default_factory=list)
    joins: list[tuple[Hashable, list[Ticket]]] = field(default_factory=list)
    whole: tuple[Route, list[Ticket]] | None = None


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
        self._groups: dict[Hashable, list[Ticket]] = {}
        self._running: dict[Hashable, _Running] = {}
        self._live: set[Ticket] = set()
        self._waiting = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._whole: list[Ticket] = []
        self.generated_tokens = 0
        """Tokens generated so far (counted by the tickets, in the generation thread)."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batch_log: list[tuple[Hashable, int]] = []
        """(route key, rows) of every group that started together, oldest first (the last 10,000)."""

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
    def waiting_rows(self) -> int:
        return self._waiting

    @property
    def running_rows(self) -> int:
        return sum(len(r.rows) for r in self._running.values()) + len(self._whole)

    @property
    def backlog(self) -> int:
        """Work tokens admitted and not yet done (see :mod:`taskmoe.serving.admission`)."""
        return sum(t.remaining for t in self._live)

    def wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # ----------------------------------------------------------------------- admission
    def unavailable(self, route: Route) -> ComponentUnavailable | None:
        """The first failed component ``route`` needs, if any."""
        needs = getattr(self.backend, "components", None)
        for c in needs(route) if needs is not None else []:
            if c in self.failed:
                return ComponentUnavailable(c, self.failed[c])
        return None

    def admit(self, routes: Sequence[Route], prompts: Sequence[Sequence[int]], n: int, max_tokens: int) -> None:
        """Raise (503 / 429) unless a request of these prompts (``n`` rows each) may start now."""
        for r in routes:
            failed = self.unavailable(r)
            if failed is not None:
                raise failed
        rows = len(prompts) * n
        if self._waiting + rows > self.limits.queue_size:
            self.metrics.rejected.inc()
            raise Refused(f"server busy: {self._waiting} of {self.limits.queue_size} queue rows taken, request needs "
                          f"{rows}; retry later", code="queue_full", retry_after=self.limits.retry_after_s)
        try:
            self.admission.check(request_cost([len(p) for p in prompts], n, max_tokens), self.backlog)
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
        self._groups.setdefault(route.key, []).extend(tickets)
        self._live.update(tickets)
        self._waiting += len(tickets)
        self._gauges()
        self.wake()
        return tickets

    def _remove(self, ticket: Ticket) -> bool:
        group = self._groups.get(ticket.route.key)
        if group is None or ticket not in group:
            return False
        group.remove(ticket)
        if not group:
            del self._groups[ticket.route.key]
        self._waiting -= 1
        self._gauges()
        return True

    def _finished(self, ticket: Ticket) -> None:
        self._live.discard(ticket)

    def _gauges(self) -> None:
        self.metrics.queue_rows.set(self._waiting)
        self.metrics.running_rows.set(self.running_rows)
        self.metrics.backlog_tokens.set(self.backlog)

    # -------------------------------------------------------------------------- planning
    def _take(self, key: Hashable, k: int) -> list[Ticket]:
        group = self._groups[key]
        taken, self._groups[key] = group[:k], group[k:]
        if not self._groups[key]:
            del self._groups[key]
        self._waiting -= len(taken)
        now = time.monotonic()
        for t in taken:
            self.metrics.queue_wait.observe(now - t.enqueued_at)
            t.prefilled = True
        self.batch_log.append((key, len(taken)))
        del self.batch_log[:-10_000]
        self.metrics.batches.inc()
        self.metrics.batch_rows.observe(len(taken))
        return taken

    def _ripe(self, key: Hashable, now: float, room: int) -> bool:
        """May ``key``'s waiting rows start now? (Joining a running batch: always.)"""
        group = self._groups[key]
        if key in self._running or len(group) >= room:
            return True
        return now - group[0].enqueued_at >= self.limits.max_wait_ms / 1000.0

    def _sweep(self) -> None:
        """Resolve waiting rows that died before they started (deadline passed while queued)."""
        for key in list(self._groups):
            for t in [t for t in self._groups.get(key, []) if not t.alive()]:
                self._remove(t)
                t.resolve(RowResult([], "halted"))

    def _plan_steps(self) -> _Plan:
        self._sweep()
        plan = _Plan()
        for key, run in self._running.items():
            dead = [h for h, t in run.rows.items() if not t.alive()]
            if dead:
                plan.drops.append((key, dead))
        now, cap = time.monotonic(), self.limits.max_batch
        fifo = self.limits.batching == "fifo"
        free = cap - self.running_rows
        order = sorted(self._groups, key=lambda k: self._groups[k][0].enqueued_at)
        for key in order:
            if fifo and free <= 0:
                break
            room = free if fifo else cap - len(self._running[key].rows) if key in self._running else cap
            if room <= 0 or not self._ripe(key, now, room):
                if fifo:
                    break  # strict arrival order: nobody overtakes the oldest waiting row
                continue
            taken = self._take(key, room)
            free -= len(taken)
            plan.joins.append((key, taken))
        return plan

    def _plan_whole(self) -> _Plan:
        self._sweep()
        now, cap = time.monotonic(), self.limits.max_batch
        order = sorted(self._groups, key=lambda k: self._groups[k][0].enqueued_at)
        full = [k for k in order if len(self._groups[k]) >= cap]
        key = full[0] if full else order[0] if order and self._ripe(order[0], now, cap) else None
        if key is None:
            return _Plan()
        taken = self._take(key, cap)
        return _Plan(whole=(taken[0].route, taken))

    def _idle_wait(self) -> float | None:
        """Seconds until the oldest waiting row's ``max_wait_ms`` ends (None: nothing waits)."""
        if not self._groups:
            return None
        oldest = min(g[0].enqueued_at for g in self._groups.values())
        return max(0.0, oldest + self.limits.max_wait_ms / 1000.0 - time.monotonic())

    # ---------------------------------------------------------------------------- worker
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            plan = self._plan_steps() if self.stepwise else self._plan_whole()
            if not (plan.drops or plan.joins or plan.whole or self._running):
                wait = self._idle_wait()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            for key, tickets in plan.joins:
                if key not in self._running:
                    self._running[key] = _Running(tickets[0].route, self.backend.open_batch(tickets[0].route))
            self._whole = plan.whole[1] if plan.whole else []
            self._gauges()
            t0, work0 = time.monotonic(), self._work_done()
            if plan.whole:
                await self._run_whole(loop, *plan.whole)
            else:
                await self._run_steps(loop, plan)
            self.admission.observe(self._work_done() - work0 + self._joined_prompt_tokens(plan), time.monotonic() - t0)
            self.metrics.decode_rate.set(self.admission.rate or 0.0)
            self._whole = []
            self._gauges()

    def _work_done(self) -> int:
        return self.generated_tokens

    @staticmethod
    def _joined_prompt_tokens(plan: _Plan) -> int:
        tickets = [t for _, ts in plan.joins for t in ts] + (plan.whole[1] if plan.whole else [])
        return sum(len(t.row.prompt_ids) for t in tickets)

    async def _run_steps(self, loop: asyncio.AbstractEventLoop, plan: _Plan) -> None:
        running = list(self._running.items())
        joins = [(self._running[k], ts) for k, ts in plan.joins]
        drops = [(self._running[k], hs) for k, hs in plan.drops]
        ended, errors = await loop.run_in_executor(self._executor, _one_step, running, joins, drops)
        self.metrics.steps.inc()
        for run, results in ended:
            for h, r in results:
                t = run.rows.pop(h, None)
                if t is not None:
                    t.resolve(r)
        for key, run in running:
            if id(run) in errors:
                self._fail(run.route, list(run.rows.values()), errors[id(run)])
                run.rows.clear()
            if not run.rows and self._running.get(key) is run:
                del self._running[key]

    async def _run_whole(self, loop: asyncio.AbstractEventLoop, route: Route, batch: list[Ticket]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self.backend.generate_batch, route,
                                                 [t.row for t in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"backend returned {len(results)} results for {len(batch)} rows")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a backend failure fails its batch, not the server
            self._fail(route, batch, e)
        else:
            for t, r in zip(batch, results):
                t.resolve(r)

    def _fail(self, route: Route, tickets: list[Ticket], error: BaseException) -> None:
        if isinstance(error, ComponentUnavailable):
            self.failed[error.component] = error.reason
            log.error("%s (route %r): answering 503 for requests that need it", error, route.key)
        else:
            log.error("generation failed for route %r: %s: %s", route.key, type(error).__name__, error)
        for t in tickets:
            t.resolve(None, error)


def _one_step(running: list[tuple[Hashable, _Running]], joins: list[tuple[_Running, list[Ticket]]],
              drops: list[tuple[_Running, list[int]]]):
    """In the generation thread: drop dead rows, join new ones, then one step of every batch.

    Returns ``([(run, [(handle, RowResult)])], {id(run): error})``; a failing batch fails alone."""
    ended: list[tuple[_Running, list[tuple[int, RowResult]]]] = []
    errors: dict[int, BaseException] = {}
    for run, handles in drops:
        ended.append((run, run.batch.drop(handles)))
    for run, tickets in joins:
        try:
            for h, t in zip(run.batch.add([t.row for t in tickets]), tickets):
                run.rows[h] = t
        except Exception as e:  # noqa: BLE001 - reported per batch
            errors[id(run)] = e
            run.rows.update({-1 - i: t for i, t in enumerate(tickets)})
    for _key, run in running:
        if id(run) in errors or not len(run.batch):
            continue
        try:
            ended.append((run, run.batch.step()))
        except Exception as e:  # noqa: BLE001
            errors[id(run)] = e
    return ended, errors
