"""What work costs in seconds on this server: measured prefill and decode rates, and the predicted
time to finish a backlog (the model :mod:`taskmoe.serving.admission` admits by).

Measured in the generation thread (:mod:`taskmoe.serving.scheduler`), never assumed:

- **prefill** ``s_p``: seconds per prompt token, the weighted ratio ``sum w t / sum w tokens`` over
  the ``add`` calls that join rows to a batch (their prompts are prefilled there, many tokens per
  forward);
- **decode round** ``t(G, R) = a G + b R``: one round steps every running batch once, ``G``
  batches (one per routing key, i.e. per distinct expert set: each runs its own forwards) with
  ``R`` rows in all. ``a`` (seconds per batch step: the fixed cost of a pass of that key's weights)
  and ``b`` (seconds per row in a step) are the weighted least-squares fit over rounds, clamped to
  ``>= 0``. Prefill never enters this fit, so a prompt-heavy join cannot make decode look fast.
  While ``G`` and ``R`` have not varied independently (e.g. always one row in one batch) the fit is
  not identified; then ``t(G, R) = tbar x max(G / Gbar, R / Rbar)`` (the weighted means): the
  larger of "all cost per batch" and "all cost per row", so neither is underestimated;
- **rounds per answer token** ``k``: a multi-stage pipeline steps its drafts before the answer, a
  plain LM steps once per token (``k = 1``); the weighted ratio of rounds to tokens over rows
  that ended normally (before any: 1).

Weights: each sample multiplies the earlier weights by ``1 - 1/WINDOW``; counted in samples, not
seconds, since a backbone round takes seconds and a tiny model's a millisecond.

**Prediction** for a backlog of rows (:class:`RowWork`: key, prompt tokens not yet prefilled,
max_tokens, rounds done, seconds to its deadline): a row has ``d = min(max(1, ceil(k x
max_tokens) - rounds_done), floor(time_left / t(1, 1)))`` rounds left (its deadline halts it);
per key ``S_g = sum d`` and ``rounds_g = max(max d, ceil(S_g / max_batch))``, and

    T = s_p x sum prompt + a x sum_g rounds_g + b x sum_g S_g

which is what the scheduler's round robin spends under the linear model, whatever the order (the
cost of every round sums to it), so the last row ends by ``T`` and ``T`` bounds every row's
completion. A row whose key is not known yet (``None``: admission before routing) is counted in
the key with the most rounds, its cheapest place, so the early check never refuses what the check
after routing would admit.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Hashable, Sequence

__all__ = ["WINDOW", "CostModel", "RoundFit", "RowWork", "UNIDENTIFIED"]

WINDOW = 32
"""Samples over which the measured rates adapt (weights decay by ``1 - 1/WINDOW`` per sample)."""
UNIDENTIFIED = 1e-3
"""The round fit is used once ``1 - corr(G, R)^2`` (weighted, uncentred) exceeds this."""


@dataclass(frozen=True)
class RowWork:
    """One row as the prediction sees it (see the module docstring)."""

    key: Hashable | None
    prompt_tokens: int
    max_tokens: int
    rounds_done: int = 0
    time_left_s: float = math.inf


class RoundFit:
    """Weighted least squares of round seconds ``t = a G + b R`` (see the module docstring)."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(("w", "g", "r", "t", "gg", "gr", "rr", "gt", "rt"), 0.0)

    def add(self, groups: float, rows: float, seconds: float) -> None:
        s, keep = self.sums, 1.0 - 1.0 / WINDOW
        for name, v in (("w", 1.0), ("g", groups), ("r", rows), ("t", seconds), ("gg", groups * groups),
                        ("gr", groups * rows), ("rr", rows * rows), ("gt", groups * seconds), ("rt", rows * seconds)):
            s[name] = keep * s[name] + v

    @property
    def measured(self) -> bool:
        return self.sums["w"] > 0 and self.sums["g"] > 0 and self.sums["r"] > 0

    def coefficients(self) -> tuple[float, float] | None:
        """``(a, b)`` when the fit is identified, else None."""
        s = self.sums
        det = s["gg"] * s["rr"] - s["gr"] ** 2
        if not self.measured or det <= UNIDENTIFIED * s["gg"] * s["rr"]:
            return None
        a = (s["gt"] * s["rr"] - s["rt"] * s["gr"]) / det
        b = (s["rt"] * s["gg"] - s["gt"] * s["gr"]) / det
        if a < 0:  # the best fit through the origin with a = 0
            return 0.0, max(0.0, s["rt"] / s["rr"])
        if b < 0:
            return max(0.0, s["gt"] / s["gg"]), 0.0
        return a, b

    def seconds(self, groups: float, rows: float) -> float:
        """Predicted seconds of ``groups`` batch steps holding ``rows`` row steps (0 before any sample)."""
        if not self.measured:
            return 0.0
        ab = self.coefficients()
        if ab is not None:
            return ab[0] * groups + ab[1] * rows
        s = self.sums
        return s["t"] / s["w"] * max(groups / (s["g"] / s["w"]), rows / (s["r"] / s["w"]))


class CostModel:
    """The measured rates and the backlog prediction (see the module docstring). Thread-safe."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.rounds = RoundFit()
        self._prefill = [0.0, 0.0]  # weighted seconds, weighted tokens
        self._per_token = [0.0, 0.0]  # weighted rounds, weighted answer tokens
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------ measuring
    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """An ``add`` call prefilled ``tokens`` prompt tokens in ``seconds``."""
        if tokens > 0 and seconds > 0:
            with self._lock:
                _decay_add(self._prefill, seconds, tokens)

    def observe_round(self, groups: int, rows: int, seconds: float) -> None:
        """A decode round stepped ``groups`` batches of ``rows`` rows in all in ``seconds``."""
        if groups > 0 and rows > 0 and seconds > 0:
            with self._lock:
                self.rounds.add(groups, rows, seconds)

    def observe_row(self, rounds: int, tokens: int) -> None:
        """A row that ended normally took ``rounds`` decode rounds for ``tokens`` answer tokens."""
        if rounds > 0 and tokens > 0:
            with self._lock:
                _decay_add(self._per_token, rounds, tokens)

    # ------------------------------------------------------------------------ the rates
    @property
    def measured(self) -> bool:
        """True once a decode round was timed (before that nothing is predicted)."""
        return self.rounds.measured

    @property
    def prefill_s_per_token(self) -> float | None:
        """``s_p``; before any prefill was timed, one decode row step per token (a safe upper guess)."""
        s, n = self._prefill
        if n > 0:
            return s / n
        return self.rounds.seconds(1, 1) if self.measured else None

    @property
    def rounds_per_token(self) -> float:
        r, n = self._per_token
        return max(1.0, r / n) if n > 0 else 1.0

    def summary(self) -> dict[str, float | None]:
        """The rates for ``/health`` (None before they are measured)."""
        with self._lock:
            ab = self.rounds.coefficients()
            return {"prefill_s_per_token": self.prefill_s_per_token,
                    "round_s_per_batch": ab[0] if ab else None, "round_s_per_row": ab[1] if ab else None,
                    "round_s_one_row": self.rounds.seconds(1, 1) if self.measured else None,
                    "rounds_per_token": self.rounds_per_token}

    # ------------------------------------------------------------------------ predicting
    def predict(self, rows: Sequence[RowWork]) -> float:
        """``T``: seconds until every row is done (see the module docstring); 0 before a round was timed."""
        with self._lock:
            if not self.measured or not rows:
                return 0.0
            k, one = self.rounds_per_token, self.rounds.seconds(1, 1)
            prompt, per_key, unknown = 0, {}, []
            for w in rows:
                prompt += w.prompt_tokens
                d = max(1, math.ceil(k * w.max_tokens) - w.rounds_done)
                if one > 0 and math.isfinite(w.time_left_s):
                    d = min(d, max(0, math.floor(w.time_left_s / one)))
                (unknown if w.key is None else per_key.setdefault(w.key, [])).append(d)
            rounds = {key: _rounds(ds, self.max_batch) for key, ds in per_key.items()}
            if unknown:  # the cheapest place: the key with the most rounds (its own group if none)
                key = max(rounds, key=rounds.get) if rounds else None
                per_key.setdefault(key, []).extend(unknown)
                rounds[key] = _rounds(per_key[key], self.max_batch)
            decode = self.rounds.seconds(sum(rounds.values()), sum(sum(ds) for ds in per_key.values()))
            return (self.prefill_s_per_token or 0.0) * prompt + decode


def _rounds(steps: list[int], max_batch: int) -> int:
    """Rounds a key needs for rows of ``steps`` rounds each, at most ``max_batch`` at a time."""
    return max(max(steps, default=0), math.ceil(sum(steps) / max_batch))


def _decay_add(acc: list[float], num: float, den: float) -> None:
    keep = 1.0 - 1.0 / WINDOW
    acc[0], acc[1] = keep * acc[0] + num, keep * acc[1] + den
