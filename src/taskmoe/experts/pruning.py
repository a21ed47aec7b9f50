"""Pruning rarely-used experts: the seed's "fewer than 3 contributions in a window of 10".

During joint training (for example the summarizer's, which reads expert drafts) every forward
pass reports which experts *contributed*: were selected with a routing weight of at least
``min_weight`` for at least one row of the batch. Counts are kept per window of ``window``
forward passes; when a window closes, every active expert with fewer than
``min_contributions`` contributions in it is pruned (removed from routing; the categories it
served fall back to the all-experts path) and the counters reset.

State is explicit (:class:`ContributionTracker` holds the counts, the pass index and the pruned
set) and each decision is returned and logged, so a recipe can record it in its metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

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
        rows = [weights] if isinstance(weights, Mapping) else list(weights)
        contributed: set[str] = set()
        for row in rows:
            for name, w in row.items():
                if name in self.counts and w >= self.cfg.min_weight and w > 0:
                    contributed.add(name)
        for name in contributed:
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
