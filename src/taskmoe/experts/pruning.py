"""Pruning rarely-used experts, as the seed says: "if an expert doesn't contribute 3/10 times,
reset every 10 feed-forwards during training, it is pruned".

- A **feed-forward** is one input *sequence* going through the system. A micro-batch of B rows is
  B feed-forwards, counted one after another in row order (under DDP: every process's rows, in
  rank order), so the rule does not depend on the batch size: an expert that serves 2 of every
  10 sequences is pruned whether they arrive one per batch or 8 per batch.
- An expert **contributes** to a sequence when it is active and the sequence gives it a routing
  weight ``> 0`` and ``>= min_weight``.
- Counts run over a **window** of ``window`` (10) feed-forwards. When a window closes, every
  active expert with fewer than ``min_contributions`` (3) contributions in it is pruned (never
  below ``keep_at_least`` active experts; the least-contributing go first) and all counts reset.
  A window may close in the middle of a batch: the pruning is applied at once and the batch's
  remaining rows are re-read with the expert gone (their weights renormalised over the others).

State is explicit (:class:`ContributionTracker`: counts, sequences seen, pruned set, history) and
each decision is returned and logged, so a recipe records it (the run's manifest ``pruned``).

:class:`PruningCallback` wires a tracker into the shared train loop
(:func:`taskmoe.training.loop.train`) without the loop knowing about experts: :meth:`~PruningCallback.wrap`
turns a loss function into one that reports every *training* micro-batch's rows (evaluation is
not counted), ``on_prune`` applies a decision to the model (e.g.
:meth:`taskmoe.experts.ensemble.RoutedMixture.prune`), ``on_step_end`` asks the loop to stop once
no expert is left to train (an expert trained alone that was pruned), and its ``state_dict``
rides in the loop's checkpoints so a resumed run keeps its counts and re-applies earlier prunings.
Where it is wired: expert training (each expert's sequences with the router's weight for it,
:mod:`taskmoe.training.recipes.experts`) and mixture training (the experts fine-tuned together as
a routed mixture, :mod:`taskmoe.training.recipes.mixture`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from taskmoe.config import Config, check_min, check_range, doc

log = logging.getLogger(__name__)


@dataclass
class PruningConfig(Config):
    enabled: bool = doc(True, "prune experts that rarely contribute")
    window: int = doc(10, "feed-forwards (input sequences) per counting window (the seed uses 10)")
    min_contributions: int = doc(3, "an expert with fewer contributions in a window is pruned (seed: 3)")
    min_weight: float = doc(0.0, "a sequence counts as a contribution only with at least this routing weight")
    keep_at_least: int = doc(1, "never prune below this many active experts")

    def validate(self) -> None:
        check_min(self, ("window",), 1)
        check_range(self, ("min_contributions",), 0, self.window)
        check_range(self, ("min_weight",))
        check_min(self, ("keep_at_least",))


@dataclass
class PruneEvent:
    window_index: int
    counts: dict[str, int]
    pruned: list[str]


Row = Mapping[str, float]  # one sequence: expert -> routing weight


@dataclass
class ContributionTracker:
    """Counts contributions per window of feed-forwards and decides pruning when a window closes."""

    experts: list[str]
    cfg: PruningConfig = field(default_factory=PruningConfig)
    counts: dict[str, int] = field(default_factory=dict)
    seen: int = 0  # feed-forwards (sequences) recorded
    windows_closed: int = 0
    pruned: list[str] = field(default_factory=list)
    history: list[PruneEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = {e: 0 for e in self.active}

    @property
    def active(self) -> list[str]:
        return [e for e in self.experts if e not in self.pruned]

    def contributors(self, row: Row) -> list[str]:
        """The active experts that contribute to one sequence (weight > 0 and >= ``min_weight``)."""
        return [e for e in self.active if row.get(e, 0.0) > 0 and row.get(e, 0.0) >= self.cfg.min_weight]

    def record(self, row: Row) -> PruneEvent | None:
        """Record one feed-forward (one sequence's ``{expert: weight}``); a :class:`PruneEvent` when
        it closes a window, else None."""
        for name in self.contributors(row):
            self.counts[name] += 1
        self.seen += 1
        if self.seen % self.cfg.window:
            return None
        return self._close_window()

    def _close_window(self) -> PruneEvent:
        counts = dict(self.counts)
        pruned_now: list[str] = []
        if self.cfg.enabled:
            # least-contributing first, so keep_at_least keeps the most useful experts
            for name in sorted(counts, key=lambda n: (counts[n], n)):
                if counts[name] >= self.cfg.min_contributions:
                    continue
                if len(self.active) - 1 < self.cfg.keep_at_least:
                    break
                self.pruned.append(name)
                pruned_now.append(name)
                log.warning(
                    "pruning expert %r: %d contribution(s) in window %d (< %d of %d feed-forwards)",
                    name, counts[name], self.windows_closed, self.cfg.min_contributions, self.cfg.window,
                )
        event = PruneEvent(window_index=self.windows_closed, counts=counts, pruned=pruned_now)
        self.history.append(event)
        self.windows_closed += 1
        self.counts = {e: 0 for e in self.active}
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "seen": self.seen, "windows_closed": self.windows_closed,
                "pruned": list(self.pruned),
                "history": [{"window_index": h.window_index, "counts": h.counts, "pruned": h.pruned} for h in self.history]}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.pruned = [e for e in d["pruned"] if e in self.experts]
        self.counts = {e: int(d["counts"].get(e, 0)) for e in self.active}
        self.seen = int(d["seen"])
        self.windows_closed = int(d["windows_closed"])
        self.history = [PruneEvent(int(h["window_index"]), dict(h["counts"]), list(h["pruned"])) for h in d["history"]]


class PruningCallback:
    """A shared-loop callback that counts contributions per feed-forward and prunes (module docstring).

    ``tracker``: the :class:`ContributionTracker`; ``on_prune(names)``: applies a pruning to the
    model being trained (called at once, and again after a resume for the experts already pruned).
    """

    def __init__(self, tracker: ContributionTracker, on_prune: Callable[[list[str]], None] | None = None) -> None:
        self.tracker = tracker
        self.on_prune = on_prune
        self.events: list[dict[str, Any]] = []
        self._step = 0

    def wrap(self, loss_fn: Callable[[Any, Any], Any], contributions: Callable[[Any], Sequence[Row]]
             ) -> Callable[[Any, Any], Any]:
        """``loss_fn`` that first reports ``contributions(batch)`` (one ``{expert: weight}`` per row)
        for each training micro-batch; evaluation passes (``model.training`` False) are not counted."""

        def fn(model: Any, batch: Any) -> Any:
            if model.training:
                self.observe(contributions(batch), lambda: contributions(batch))
            return loss_fn(model, batch)

        return fn

    def observe(self, rows: Sequence[Row], reread: Callable[[], Sequence[Row]] | None = None) -> list[PruneEvent]:
        """Record a micro-batch: each row is one feed-forward, every process's rows in rank order.

        ``reread()`` gives the rows again after a pruning (their weights without the pruned expert),
        for the rows after a window that closes mid-batch. Returns the windows closed."""
        rows = _rows_of_all_processes(rows)
        closed: list[PruneEvent] = []
        i = 0
        while i < len(rows):
            event = self.tracker.record(rows[i])
            i += 1
            if event is None:
                continue
            closed.append(event)
            if event.pruned:
                self.events.append({"step": self._step + 1, "window": event.window_index, "pruned": event.pruned,
                                    "counts": event.counts})
                if self.on_prune is not None:
                    self.on_prune(list(event.pruned))
                if reread is not None and i < len(rows):
                    rows = _rows_of_all_processes(reread())
        return closed

    # ------------------------------------------------------------------ loop callback protocol
    def on_step_end(self, step: int, record: dict[str, Any]) -> bool:
        """Stop the loop once every expert it trains is pruned."""
        self._step = step
        return not self.tracker.active

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "events": list(self.events), "step": self._step}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(d["tracker"])
        self.events = list(d.get("events", []))
        self._step = int(d.get("step", 0))
        if self.tracker.pruned and self.on_prune is not None:
            self.on_prune(list(self.tracker.pruned))


def _rows_of_all_processes(rows: Sequence[Row]) -> list[dict[str, float]]:
    """Every process's rows (of the default torch.distributed group, if any), in rank order."""
    import torch.distributed as dist

    mine = [{str(k): float(v) for k, v in r.items()} for r in rows]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [r for part in gathered for r in part]
