"""What work costs in seconds on this server: measured prefill and decode rates, and the predicted
time to finish a backlog (the model :mod:`taskmoe.serving.admission` admits by).

Measured in the generation thread (:mod:`taskmoe.serving.scheduler`), never assumed, each as a
:class:`LinearFit` ``t = a x + b y`` (weighted least squares, ``a, b >= 0``):

- **prefill**, one sample per ``add`` call (rows joining a batch: their prompts are prefilled
  there, many tokens per forward): ``t = a_p x rows + b_p x prompt tokens`` (seconds per joining
  row -- an IMoE system prefills each selected expert's own prompt -- and per prompt token);
- **decode**, one sample per batch step (one decode step of one routing key's batch, i.e. of one
  distinct expert set: each runs its own forwards): ``t = a x 1 + b x rows`` (seconds per batch step,
  the fixed cost of a pass of that key's weights, and per row in the step). Prefill never enters
  this fit, so a prompt-heavy join cannot make decoding look fast. A round steps every running
  batch once, so a round of ``G`` keys and ``R`` rows costs ``sum over its keys``;
- **rounds per answer token** ``k``: a multi-stage pipeline steps its drafts before the answer, a
  plain LM once per token (``k = 1``): the weighted ratio of rounds to tokens over rows that
  ended normally (before any: 1).

Each fit is kept **per routing key** (a key with 4 experts steps slower than one with 2) and over
all keys; a key's own fit is used once it holds :data:`MIN_KEY_SAMPLES` samples, else the fit over
all keys. While ``x`` and ``y`` have not varied independently (e.g. always one row) a fit is not
identified; then ``t(x, y) = tbar x max(x / xbar, y / ybar)`` (weighted means): the larger of
"all cost per step" and "all cost per row", so neither is underestimated. Weights: each sample
multiplies the earlier ones by ``1 - 1/WINDOW``; counted in samples, not seconds, since a
backbone step takes a second and a tiny model's a millisecond.

**Prediction** for a backlog of rows (:class:`RowWork`: key, prompt tokens not yet prefilled,
max_tokens, rounds done, seconds to its deadline): a row has ``d = min(max(1, ceil(k x
max_tokens) - rounds_done), floor(time_left / t_key(1, 1)))`` rounds left (its deadline halts it);
per key ``S_g = sum d``, ``rounds_g = max(max d, ceil(S_g / max_batch))``, and

    T = sum_g [prefill_g(rows not yet prefilled, their prompt tokens) + decode_g(rounds_g, S_g)]

which is what the scheduler's round robin spends under the linear model, whatever the order (the
cost of every step sums to it), so the last row ends by ``T`` and ``T`` bounds every row's
completion. A row whose key is not known yet (``None``: admission before routing) is counted in
the key with the most rounds, its cheapest place, so the early check never refuses what the check
after routing would admit.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Hashable, Sequence

__all__ = ["WINDOW", "MIN_KEY_SAMPLES", "CostModel", "KeyedFit", "LinearFit", "RowWork", "UNIDENTIFIED"]

WINDOW = 32
"""Samples over which the measured rates adapt (weights decay by ``1 - 1/WINDOW`` per sample)."""
UNIDENTIFIED = 1e-3
"""A fit is used once ``1 - corr(x, y)^2`` (weighted, uncentred) exceeds this."""
MIN_KEY_SAMPLES = 3
"""Samples a routing key's own fit needs before it replaces the fit over all keys."""
MAX_KEYS = 1024
"""Keys with their own fits, at most (the oldest is forgotten first)."""


@dataclass(frozen=True)
class RowWork:
    """One row as the prediction sees it (see the module docstring)."""

    key: Hashable | None
    prompt_tokens: int
    max_tokens: int
    rounds_done: int = 0
    time_left_s: float = math.inf


class LinearFit:
    """Weighted least squares of seconds ``t = a x + b y`` (see the module docstring)."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(("w", "x", "y", "t", "xx", "xy", "yy", "xt", "yt"), 0.0)
        self.samples = 0

    def add(self, x: float, y: float, seconds: float) -> None:
        s, keep = self.sums, 1.0 - 1.0 / WINDOW
        for name, v in (("w", 1.0), ("x", x), ("y", y), ("t", seconds), ("xx", x * x), ("xy", x * y),
                        ("yy", y * y), ("xt", x * seconds), ("yt", y * seconds)):
            s[name] = keep * s[name] + v
        self.samples += 1

    @property
    def measured(self) -> bool:
        return self.sums["x"] > 0 and self.sums["y"] > 0

    def coefficients(self) -> tuple[float, float] | None:
        """``(a, b)`` when the fit is identified, else None."""
        s = self.sums
        det = s["xx"] * s["yy"] - s["xy"] ** 2
        if not self.measured or det <= UNIDENTIFIED * s["xx"] * s["yy"]:
            return None
        a = (s["xt"] * s["yy"] - s["yt"] * s["xy"]) / det
        b = (s["yt"] * s["xx"] - s["xt"] * s["xy"]) / det
        if a < 0:  # the best fit through the origin with a = 0
            return 0.0, max(0.0, s["yt"] / s["yy"])
        if b < 0:
            return max(0.0, s["xt"] / s["xx"]), 0.0
        return a, b

    def seconds(self, x: float, y: float) -> float:
        """Predicted seconds of ``x`` steps (calls) holding ``y`` rows (tokens); 0 before any sample."""
        if not self.measured:
            return 0.0
        ab = self.coefficients()
        if ab is not None:
            return ab[0] * x + ab[1] * y
        s = self.sums
        return s["t"] / s["w"] * max(x / (s["x"] / s["w"]), y / (s["y"] / s["w"]))


class KeyedFit:
    """A :class:`LinearFit` per routing key and one over all keys (see the module docstring)."""

    def __init__(self) -> None:
        self.all = LinearFit()
        self.by_key: dict[Hashable, LinearFit] = {}

    def add(self, key: Hashable | None, x: float, y: float, seconds: float) -> None:
        self.all.add(x, y, seconds)
        fit = self.by_key.pop(key, None) or LinearFit()
        fit.add(x, y, seconds)
        self.by_key[key] = fit  # most recently used last
        if len(self.by_key) > MAX_KEYS:
            del self.by_key[next(iter(self.by_key))]

    def fit(self, key: Hashable | None) -> LinearFit:
        own = self.by_key.get(key)
        return own if own is not None and own.samples >= MIN_KEY_SAMPLES and own.measured else self.all

    def seconds(self, key: Hashable | None, x: float, y: float) -> float:
        return self.fit(key).seconds(x, y)


class CostModel:
    """The measured rates and the backlog prediction (see the module docstring). Thread-safe."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.prefill = KeyedFit()
        self.decode = KeyedFit()
        self._per_token = [0.0, 0.0]  # weighted rounds, weighted answer tokens
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------ measuring
    def observe_prefill(self, key: Hashable | None, rows: int, tokens: int, seconds: float) -> None:
        """An ``add`` call joined ``rows`` rows of ``tokens`` prompt tokens in all in ``seconds``."""
        if rows > 0 and tokens > 0 and seconds > 0:
            with self._lock:
                self.prefill.add(key, rows, tokens, seconds)

    def observe_step(self, key: Hashable | None, rows: int, seconds: float, steps: int = 1) -> None:
        """``steps`` decode steps of ``key``'s batch, ``rows`` row steps in all, took ``seconds``."""
        if steps > 0 and rows > 0 and seconds > 0:
            with self._lock:
                self.decode.add(key, steps, rows, seconds)

    def observe_row(self, rounds: int, tokens: int) -> None:
        """A row that ended normally took ``rounds`` decode rounds for ``tokens`` answer tokens."""
        if rounds > 0 and tokens > 0:
            with self._lock:
                keep = 1.0 - 1.0 / WINDOW
                self._per_token = [keep * self._per_token[0] + rounds, keep * self._per_token[1] + tokens]

    # ------------------------------------------------------------------------ the rates
    @property
    def measured(self) -> bool:
        """True once a decode step was timed (before that nothing is predicted)."""
        return self.decode.all.measured

    @property
    def rounds_per_token(self) -> float:
        r, n = self._per_token
        return max(1.0, r / n) if n > 0 else 1.0

    def prefill_s(self, key: Hashable | None, rows: int, tokens: int) -> float:
        """Seconds to join ``rows`` rows of ``tokens`` prompt tokens; before any join was timed, one
        decode row step per token (a safe upper guess)."""
        if not rows:
            return 0.0
        if self.prefill.all.measured:
            return self.prefill.seconds(key, rows, tokens)
        return tokens * self.decode.seconds(key, 1, 1)

    def summary(self) -> dict[str, float | None]:
        """The rates over all keys for ``/health`` (None before they are measured or identified)."""
        with self._lock:
            p, d = self.prefill.all.coefficients(), self.decode.all.coefficients()
            return {"prefill_s_per_row": p[0] if p else None, "prefill_s_per_token": p[1] if p else None,
                    "step_s_per_batch": d[0] if d else None, "step_s_per_row": d[1] if d else None,
                    "step_s_one_row": self.decode.all.seconds(1, 1) if self.measured else None,
                    "rounds_per_token": self.rounds_per_token, "keys": float(len(self.decode.by_key))}

    # ------------------------------------------------------------------------ predicting
    def predict(self, rows: Sequence[RowWork]) -> float:
        """``T``: seconds until every row is done (see the module docstring); 0 before a step was timed."""
        with self._lock:
            if not self.measured or not rows:
                return 0.0
            k = self.rounds_per_token
            steps: dict[Hashable | None, list[int]] = {}
            joins: dict[Hashable | None, list[int]] = {}
            unknown: list[RowWork] = []
            for w in rows:
                if w.key is None:
                    unknown.append(w)
                    continue
                _count(w, k, self.decode.seconds(w.key, 1, 1), steps, joins, w.key)
            rounds = {key: _rounds(ds, self.max_batch) for key, ds in steps.items()}
            place = max(rounds, key=rounds.get) if rounds else None  # a row not routed yet: its cheapest place
            for w in unknown:
                _count(w, k, self.decode.seconds(place, 1, 1), steps, joins, place)
            total = 0.0
            for key, ds in steps.items():
                total += self.decode.seconds(key, _rounds(ds, self.max_batch), sum(ds))
            for key, prompts in joins.items():
                total += self.prefill_s(key, len(prompts), sum(prompts))
            return total


def _count(w: RowWork, k: float, one_step_s: float, steps: dict, joins: dict, key: Hashable | None) -> None:
    """Add row ``w``'s rounds left (and its prompt, if not prefilled yet) under ``key``."""
    d = max(1, math.ceil(k * w.max_tokens) - w.rounds_done)
    if one_step_s > 0 and math.isfinite(w.time_left_s):
        d = min(d, max(0, math.floor(w.time_left_s / one_step_s)))
    steps.setdefault(key, []).append(d)
    if w.prompt_tokens:
        joins.setdefault(key, []).append(w.prompt_tokens)


def _rounds(steps: list[int], max_batch: int) -> int:
    """Rounds a key needs for rows of ``steps`` rounds each, at most ``max_batch`` at a time."""
    return max(max(steps, default=0), math.ceil(sum(steps) / max_batch))
