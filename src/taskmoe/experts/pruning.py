"""Pruning rarely-used experts: the seed's "fewer than 3 contributions in a window of 10".

During joint training (for example the summarizer's, which reads expert drafts) every forward
pass reports which experts *contributed*: were selected with a routing weight of at least
``min_weight`` for at least one row of the batch. Counts are kept per window of ``window``
forward passes; when a window closes, every active expert with fewer than
``min_contributions`` contributions in it is pruned (removed from routing; the categories it
served fall back to the all-experts path) and the counters reset.

State is explicit (:class:`ContributionTracker` holds the counts, the pass index and the pruned
set) and each decision is returned and logged, so a recipe can record it in its metrics.

:class:`PruningCallback` wires a tracker into the shared train loop
(:func:`taskmoe.training.loop.train`) without the loop knowing about experts: its
:meth:`~PruningCallback.wrap` turns a loss function into one that reports every *training*
forward pass (one micro-batch) to the tracker, ``on_prune`` applies a decision to the model
(e.g. :meth:`taskmoe.experts.ensemble.RoutedMixture.prune`), and its ``state_dict`` rides in
the loop's checkpoints so a resumed run keeps its counts and re-applies earlier prunings.
Under DDP each process sees other rows, so the set of contributors of a pass is the union over
processes (an all-reduce MAX of a 0/1 vector): every process takes the same decisions, the
ones a single process with the same global micro-batch would take.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from taskmoe.config import Config, check, doc

log = logging.getLogger(__name__)


@dataclass
class PruningConfig(Config):
    enabled: bool = doc(True, "prune experts that rarely contribute")
    window: int = doc(10, "forward passes per counting window (the seed uses 10)")
    min_contributions: int = doc(3, "an expert with fewer contributions in a window is pruned (seed: 3)")
    min_weight: float = doc(0.0, "a selection counts as a contribution only with at least this routing weight")
    keep_at_least: int = doc(1, "never prune below this many active experts")

    def validate(self) -> None:
        check(self.window >= 1, f"window must be >= 1, got {self.window}")
        check(0 <= self.min_contributions <= self.window, f"min_contributions must be in [0, window], got {self.min_contributions}")
        check(0.0 <= self.min_weight <= 1.0, f"min_weight must be in [0, 1], got {self.min_weight}")
        check(self.keep_at_least >= 1, f"keep_at_least must be >= 1, got {self.keep_at_least}")


@dataclass
class PruneEvent:
    window_index: int
    counts: dict[str, int]
    pruned: list[str]


@dataclass
class ContributionTracker:
    """Counts contributions per window and decides pruning when a window closes."""

    experts: list[str]
    cfg: PruningConfig = field(default_factory=PruningConfig)
    counts: dict[str, int] = field(default_factory=dict)
    passes: int = 0
    windows_closed: int = 0
    pruned: list[str] = field(default_factory=list)
    history: list[PruneEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = {e: 0 for e in self.active}

    @property
    def active(self) -> list[str]:
        return [e for e in self.experts if e not in self.pruned]

    def record(self, weights: Mapping[str, float] | Iterable[Mapping[str, float]]) -> PruneEvent | None:
        """Record one forward pass. ``weights`` maps expert -> routing weight for one row, or is a
        list of such maps (one per row of the batch). Returns a :class:`PruneEvent` when this
        pass closes a window, else None."""
        return self.record_names(self.contributors(weights))

    def contributors(self, weights: Mapping[str, float] | Iterable[Mapping[str, float]]) -> list[str]:
        """The active experts that contributed to a pass (weight > 0 and >= ``min_weight`` in some row)."""
        rows = [weights] if isinstance(weights, Mapping) else list(weights)
        contributed: set[str] = set()
        for row in rows:
            for name, w in row.items():
                if name in self.counts and w >= self.cfg.min_weight and w > 0:
                    contributed.add(name)
        return [e for e in self.active if e in contributed]

    def record_names(self, contributed: Iterable[str]) -> PruneEvent | None:
        """Record one forward pass whose contributors are already known (see :meth:`contributors`)."""
        for name in set(contributed) & set(self.counts):
            self.counts[name] += 1
        self.passes += 1
        if self.passes % self.cfg.window:
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
                    "pruning expert %r: %d contribution(s) in window %d (< %d of %d passes)",
                    name, counts[name], self.windows_closed, self.cfg.min_contributions, self.cfg.window,
                )
        event = PruneEvent(window_index=self.windows_closed, counts=counts, pruned=pruned_now)
        self.history.append(event)
        self.windows_closed += 1
        self.counts = {e: 0 for e in self.active}
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "passes": self.passes, "windows_closed": self.windows_closed,
                "pruned": list(self.pruned),
                "history": [{"window_index": h.window_index, "counts": h.counts, "pruned": h.pruned} for h in self.history]}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.pruned = [e for e in d["pruned"] if e in self.experts]
        self.counts = {e: int(d["counts"].get(e, 0)) for e in self.active}
        self.passes = int(d["passes"])
        self.windows_closed = int(d["windows_closed"])
        self.history = [PruneEvent(int(h["window_index"]), dict(h["counts"]), list(h["pruned"])) for h in d["history"]]


class PruningCallback:
    """A shared-loop callback that counts contributions per forward pass and prunes (module docstring).

    ``tracker``: the :class:`ContributionTracker`; ``on_prune(names)``: applies a pruning to the
    model being trained (called at once, and again after a resume for the experts already pruned).
    """

    def __init__(self, tracker: ContributionTracker, on_prune: Callable[[list[str]], None] | None = None) -> None:
        self.tracker = tracker
        self.on_prune = on_prune
        self.events: list[dict[str, Any]] = []
        self._step = 0

    def wrap(self, loss_fn: Callable[[Any, Any], Any], contributions: Callable[[Any], Sequence[Mapping[str, float]]]
             ) -> Callable[[Any, Any], Any]:
        """``loss_fn`` that first reports ``contributions(batch)`` (rows of ``{expert: weight}``) for
        each training forward pass; evaluation passes (``model.training`` False) are not counted."""

        def fn(model: Any, batch: Any) -> Any:
            if model.training:
                self.observe(contributions(batch))
            return loss_fn(model, batch)

        return fn

    def observe(self, rows: Sequence[Mapping[str, float]]) -> PruneEvent | None:
        """Record one forward pass (synchronised across processes under torch.distributed)."""
        names = self.tracker.contributors(rows)
        names = _union_over_processes(self.tracker.active, names)
        event = self.tracker.record_names(names)
        if event is not None and event.pruned:
            self.events.append({"step": self._step + 1, "window": event.window_index, "pruned": event.pruned,
                                "counts": event.counts})
            if self.on_prune is not None:
                self.on_prune(list(event.pruned))
        return event

    # ------------------------------------------------------------------ loop callback protocol
    def on_step_end(self, step: int, record: dict[str, Any]) -> None:
        self._step = step
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "events": list(self.events), "step": self._step}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(d["tracker"])
        self.events = list(d.get("events", []))
        self._step = int(d.get("step", 0))
        if self.tracker.pruned and self.on_prune is not None:
            self.on_prune(list(self.tracker.pruned))


def _union_over_processes(active: list[str], names: list[str]) -> list[str]:
    """``names`` united over every process of the default torch.distributed group (if any)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return names
    flags = torch.tensor([1.0 if e in names else 0.0 for e in active])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [e for e, f in zip(active, flags.tolist()) if f > 0]
