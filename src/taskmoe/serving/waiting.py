"""The rows waiting to start (:class:`WaitingRows`) and what starts next (:class:`Planner`).

Kept apart from the scheduler so each has one job: :class:`WaitingRows` holds rows grouped by
routing key and answers "which group, how many, how long until the oldest row's wait ends";
:class:`Planner` turns that and the running batches into one iteration's :class:`Plan` (see
:mod:`taskmoe.serving.scheduler` for the rules); the scheduler runs it. A group is *ripe* when it may start: it can join a running batch of its key (always),
it fills a batch, or its oldest row has waited ``max_wait_ms``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Mapping

from taskmoe.serving.backend import Route, RowResult
from taskmoe.serving.limits import Limits
from taskmoe.serving.metrics import ServerMetrics
from taskmoe.serving.tickets import Ticket

__all__ = ["WaitingRows", "Planner", "Plan"]


@dataclass
class Plan:
    """What one scheduler iteration does: drop dead rows, start/join rows, or run one whole batch."""

    drops: list[tuple[Hashable, list[int]]] = field(default_factory=list)
    joins: list[tuple[Hashable, list[Ticket]]] = field(default_factory=list)
    whole: tuple[Route, list[Ticket]] | None = None

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens this plan prefills (work the admission rate counts)."""
        tickets = [t for _, ts in self.joins for t in ts] + (self.whole[1] if self.whole else [])
        return sum(len(t.row.prompt_ids) for t in tickets)


class WaitingRows:
    """Waiting tickets by ``route.key``, each group in arrival order."""

    def __init__(self, max_wait_ms: float) -> None:
        self.max_wait_s = max_wait_ms / 1000.0
        self._groups: dict[Hashable, list[Ticket]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: Hashable) -> bool:
        return key in self._groups

    def size(self, key: Hashable) -> int:
        return len(self._groups.get(key, ()))

    def add(self, tickets: list[Ticket]) -> None:
        for t in tickets:
            self._groups.setdefault(t.route.key, []).append(t)
        self._count += len(tickets)

    def remove(self, ticket: Ticket) -> bool:
        """Drop ``ticket`` if it is still waiting; True if it was."""
        group = self._groups.get(ticket.route.key)
        if group is None or ticket not in group:
            return False
        group.remove(ticket)
        if not group:
            del self._groups[ticket.route.key]
        self._count -= 1
        return True

    def __iter__(self) -> Iterator[Ticket]:
        for group in list(self._groups.values()):
            yield from list(group)

    def take(self, key: Hashable, k: int) -> list[Ticket]:
        """The ``k`` oldest rows of ``key`` (fewer if it holds fewer), removed."""
        group = self._groups[key]
        taken, rest = group[:k], group[k:]
        if rest:
            self._groups[key] = rest
        else:
            del self._groups[key]
        self._count -= len(taken)
        return taken

    def by_age(self) -> list[Hashable]:
        """Keys, the one holding the oldest row first."""
        return sorted(self._groups, key=lambda k: self._groups[k][0].enqueued_at)

    def ripe(self, key: Hashable, room: int, *, running: bool, now: float | None = None) -> bool:
        """May ``key``'s rows start now? (see the module docstring)"""
        group = self._groups[key]
        if running or len(group) >= room:
            return True
        return (time.monotonic() if now is None else now) - group[0].enqueued_at >= self.max_wait_s

    def dead(self) -> Iterator[Ticket]:
        """Waiting rows that are no longer alive (cancelled, or their deadline passed while queued)."""
        yield from [t for t in self if not t.alive()]

    def until_ripe(self) -> float | None:
        """Seconds until the oldest row's ``max_wait_ms`` ends (None: nothing waits)."""
        if not self._groups:
            return None
        oldest = min(g[0].enqueued_at for g in self._groups.values())
        return max(0.0, oldest + self.max_wait_s - time.monotonic())


class Planner:
    """One scheduler iteration's :class:`Plan` from the waiting rows and the running batches."""

    def __init__(self, limits: Limits, metrics: ServerMetrics) -> None:
        self.limits, self.metrics = limits, metrics
        self.queue = WaitingRows(limits.max_wait_ms)
        self.batch_log: list[tuple[Hashable, int]] = []

    def take(self, key: Hashable, k: int) -> list[Ticket]:
        taken = self.queue.take(key, k)
        now = time.monotonic()
        for t in taken:
            self.metrics.queue_wait.observe(now - t.enqueued_at)
            t.prefilled = True
        self.batch_log.append((key, len(taken)))
        del self.batch_log[:-10_000]
        self.metrics.batches.inc()
        self.metrics.batch_rows.observe(len(taken))
        return taken

    def sweep(self) -> None:
        """Resolve waiting rows that died before they started (deadline passed while queued)."""
        for t in list(self.queue.dead()):
            self.queue.remove(t)
            t.resolve(RowResult([], "halted"))

    def steps(self, running: Mapping[Hashable, Any], running_rows: int) -> Plan:
        """Drops of dead rows, joins of waiting rows (grouped or FIFO), for one step of every batch."""
        self.sweep()
        plan = Plan()
        for key, run in running.items():
            dead = [h for h, t in run.rows.items() if not t.alive()]
            if dead:
                plan.drops.append((key, dead))
        now, cap = time.monotonic(), self.limits.max_batch
        fifo = self.limits.batching == "fifo"
        free = cap - running_rows
        for key in self.queue.by_age():
            joins = key in running
            room = free if fifo else cap - len(running[key].rows) if joins else cap
            if room <= 0 or not self.queue.ripe(key, room, running=joins, now=now):
                if fifo:
                    break  # strict arrival order: nobody overtakes the oldest waiting row
                continue
            taken = self.take(key, room)
            free -= len(taken)
            plan.joins.append((key, taken))
        return plan

    def whole(self) -> Plan:
        """The group to run to the end now: a full one, else the oldest once it waited max_wait_ms."""
        self.sweep()
        cap = self.limits.max_batch
        order = self.queue.by_age()
        full = [k for k in order if self.queue.size(k) >= cap]
        key = full[0] if full else order[0] if order and self.queue.ripe(order[0], cap, running=False) else None
        if key is None:
            return Plan()
        taken = self.take(key, cap)
        return Plan(whole=(taken[0].route, taken))
