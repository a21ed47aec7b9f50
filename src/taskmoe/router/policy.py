"""The routing policy: complexity-adaptive threshold, multi-expert selection, fallback, cross-talk.

Pure functions over a confidence vector (or a batch of them); no state, no model. This is the
IMoE seed's "Classifier" inference rule, step by step:

1. ``t_C = t_C_base * (1 - log(1 + k*c_S) / log(1 + k))``   (:func:`threshold`)
2. selected = every category with confidence ``> t_C`` (strict; several allowed) (:func:`select`)
3. none selected -> *fallback*: every expert runs                         (:func:`decide`)
4. the top two confidences within ``t_CT`` -> cross-talk between those two (:func:`crosstalk_pair`),
   whether or not both passed ``t_C``: a member that did not joins the selection

Glossary (seed symbol -> variable):

- ``c``     (C)        softmax confidences over the n_C categories, shape ``(K,)``, sum 1
- ``c_S``   (c_S)      complexity of the input in ``[0, 1]`` (the logistic-regression scorer)
- ``t_C``   (t_C)      selection threshold for this input
- ``t_C_base`` (t_C_base) the user's base threshold (``t_C`` at ``c_S = 0``)
- ``k``     (k)        > 0, how fast the threshold falls with complexity (``k -> 0``: linear fall
                       ``t_C_base*(1-c_S)``; large ``k``: falls early, like a log)
- ``t_CT``  (t_CT)     cross-talk threshold on the gap between the two highest confidences

Design choices (each is tested):

- **Selection is strict** (``c > t_C``): at ``c_S = 1`` the threshold is exactly 0 and every
  category with non-zero confidence runs, as the seed intends for the hardest inputs.
- **Weights** of the selected experts are their confidences renormalised over the selected set
  ("higher-confidence experts have more influence"). In the **fallback** every expert runs and
  the weights are the full confidence vector (already summing to 1), not uniform: the router's
  soft opinion is still the best mixing prior (the c-BTM ensemble rule).
- **Cross-talk boundary is inclusive**: ``c_top1 - c_top2 <= t_CT`` triggers. Because the gap
  is a difference of floats, it is compared with an absolute tolerance ``GAP_EPS = 1e-6`` so
  that inputs written as decimals (0.55, 0.45, t_CT = 0.1) behave as written, in float32 too.
  Ties in confidence are broken by the lower category index.
- **Cross-talk as the seed writes it** ("if two categories are within t_CT of each other in the
  softmax scores, expert cross-talk is allowed"): the trigger looks at the top two scores only,
  not at ``t_C``. The ambiguous case, e.g. scores (0.34, 0.29, ...) with ``t_C = 0.3``, is exactly
  what cross-talk is for, so the second speaker **joins the selection** (``joined`` lists the
  categories selected only for the dialogue) and the weights are renormalised over the enlarged
  set. In a fallback every expert already runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from taskmoe.config import Config, check, check_range, doc
from taskmoe.errors import ConfigError

GAP_EPS = 1e-6
"""Absolute tolerance of the inclusive cross-talk boundary (see the module docstring)."""


@dataclass
class PolicyConfig(Config):
    """Thresholds of the routing policy (the seed's t_C_base, k and t_CT)."""

    t_C_base: float = doc(0.3, "base selection threshold t_C_base in [0, 1]: t_C at complexity c_S = 0")
    k: float = doc(10.0, "k > 0: how fast t_C falls with complexity c_S (log curve; k->0 is linear)")
    t_CT: float = doc(0.1, "cross-talk threshold: the top two confidences within t_CT start cross-talk")

    def validate(self) -> None:
        check_range(self, ("t_C_base", "t_CT"), owner="policy")
        check(self.k > 0 and math.isfinite(self.k), f"policy.k must be a finite number > 0, got {self.k}")


# ------------------------------------------------------------------------------ threshold
def _check_k(k: float) -> None:
    if not (isinstance(k, (int, float, np.floating)) and k > 0 and math.isfinite(k)):
        raise ConfigError(f"threshold: k must be a finite number > 0, got {k!r}")


def threshold(t_C_base: float, k: float, c_S: float) -> float:
    """Complexity-adaptive selection threshold.

    ``t_C = t_C_base * (1 - log(1 + k*c_S) / log(1 + k))``, ``k > 0``, ``c_S in [0, 1]``.

    ``c_S = 0`` gives ``t_C_base``; ``c_S = 1`` gives exactly 0; in between the curve is concave
    in the fall (log), e.g. ``t_C_base=0.3, k=10, c_S=0.5``: ``0.3*(1 - ln 6/ln 11) = 0.075833``.
    Raises ConfigError for ``k <= 0`` or ``c_S`` outside ``[0, 1]`` (NaN included).
    """
    _check_k(k)
    if not (0.0 <= c_S <= 1.0):
        raise ConfigError(f"threshold: c_S must be in [0, 1], got {c_S!r}")
    return float(t_C_base * (1.0 - math.log1p(k * c_S) / math.log1p(k)))


def threshold_batch(t_C_base: float, k: float, c_S: np.ndarray) -> np.ndarray:
    """:func:`threshold` for a vector of complexities ``c_S (N,)`` -> ``t_C (N,)`` (same formula)."""
    _check_k(k)
    c_S = np.asarray(c_S, dtype=np.float64)
    if c_S.size and not (np.all(c_S >= 0.0) and np.all(c_S <= 1.0)):
        bad = c_S[~((c_S >= 0.0) & (c_S <= 1.0))][0]
        raise ConfigError(f"threshold: every c_S must be in [0, 1], got {bad!r}")
    return t_C_base * (1.0 - np.log1p(k * c_S) / math.log1p(k))


# ------------------------------------------------------------------------------ selection
def _as_confidences(confidences: Sequence[float] | np.ndarray) -> np.ndarray:
    c = np.asarray(confidences, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ConfigError(f"confidences must be a non-empty vector, got shape {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ConfigError(f"confidences must be finite and >= 0, got {c.tolist()}")
    return c


def select(confidences: Sequence[float] | np.ndarray, t_C: float) -> list[int]:
    """Indices of the categories with confidence strictly above ``t_C``: ``{i : c_i > t_C}``.

    Returned in decreasing confidence (ties: lower index first); may be empty (see fallback).
    """
    c = _as_confidences(confidences)
    order = np.argsort(-c, kind="stable")
    return [int(i) for i in order if c[i] > t_C]


def select_batch(confidences: np.ndarray, t_C: np.ndarray) -> np.ndarray:
    """Selection mask for a batch: ``mask[n, i] = c[n, i] > t_C[n]``; ``(N, K), (N,) -> (N, K)``."""
    c = np.asarray(confidences, dtype=np.float64)
    return c > np.asarray(t_C, dtype=np.float64)[:, None]


def crosstalk_pair(confidences: Sequence[float] | np.ndarray, t_CT: float) -> tuple[int, int] | None:
    """The top two categories if their confidences are within ``t_CT``, else None.

    Trigger: ``c_(1) - c_(2) <= t_CT`` (inclusive, tolerance ``GAP_EPS``), where ``c_(1) >= c_(2)``
    are the two highest confidences; the pair is returned as ``(top1, top2)``. Needs at least two
    categories (one category -> None).
    """
    c = _as_confidences(confidences)
    if c.size < 2:
        return None
    order = np.argsort(-c, kind="stable")
    a, b = int(order[0]), int(order[1])
    return (a, b) if c[a] - c[b] <= t_CT + GAP_EPS else None


def crosstalk_batch(confidences: np.ndarray, t_CT: float) -> tuple[np.ndarray, np.ndarray]:
    """Batched :func:`crosstalk_pair`: ``(N, K) -> pairs (N, 2) int, triggered (N,) bool``."""
    c = np.asarray(confidences, dtype=np.float64)
    n, k = c.shape
    if k < 2:
        return np.zeros((n, 2), dtype=np.int64), np.zeros(n, dtype=bool)
    order = np.argsort(-c, axis=1, kind="stable")[:, :2]  # (N, 2)
    top = np.take_along_axis(c, order, axis=1)  # (N, 2)
    return order.astype(np.int64), (top[:, 0] - top[:, 1]) <= t_CT + GAP_EPS


# ------------------------------------------------------------------------------- decision
@dataclass
class RoutingDecision:
    """Everything the router decided for one input.

    - ``confidences``: calibrated softmax confidences, one per category (sum 1).
    - ``c_S``: complexity in [0, 1]; ``t_C``: the threshold it produced.
    - ``selected``: category indices that run, highest confidence first; ``weights``: their mixing
      weights (sum 1), aligned with ``selected``.
    - ``fallback``: True when no category cleared ``t_C`` (or the input gave the router nothing
      to go on, see ``reason``) and every expert runs.
    - ``crosstalk``: ``(i, j)`` when the two top categories are within ``t_CT`` (both then run).
    - ``categories``: category names, aligned with ``confidences``; ``reason``: why a fallback
      happened ("" for a normal decision); ``joined``: categories selected only because they are
      in the cross-talk pair (they did not pass ``t_C``).
    """

    confidences: list[float]
    c_S: float
    t_C: float
    selected: list[int]
    weights: list[float]
    fallback: bool
    crosstalk: tuple[int, int] | None
    categories: list[str] = field(default_factory=list)
    reason: str = ""
    joined: list[int] = field(default_factory=list)

    @property
    def selected_names(self) -> list[str]:
        return [self.categories[i] if i < len(self.categories) else str(i) for i in self.selected]

    @property
    def top(self) -> int:
        """Index of the most confident category."""
        return int(np.argmax(self.confidences))

    def to_dict(self) -> dict[str, Any]:
        return {
            "categories": list(self.categories),
            "confidences": [float(x) for x in self.confidences],
            "c_S": float(self.c_S),
            "t_C": float(self.t_C),
            "selected": list(self.selected),
            "weights": [float(x) for x in self.weights],
            "fallback": bool(self.fallback),
            "crosstalk": list(self.crosstalk) if self.crosstalk is not None else None,
            "reason": self.reason,
            "joined": list(self.joined),
        }


def decide(
    confidences: Sequence[float] | np.ndarray,
    c_S: float,
    policy: PolicyConfig,
    categories: Sequence[str] = (),
) -> RoutingDecision:
    """Apply the whole policy to one confidence vector (see the module docstring)."""
    c = _as_confidences(confidences)
    t_C = threshold(policy.t_C_base, policy.k, c_S)
    sel = select(c, t_C)
    fallback = not sel
    pair = crosstalk_pair(c, policy.t_CT)
    joined = [] if fallback or pair is None else [i for i in pair if i not in sel]
    if fallback:
        sel = [int(i) for i in np.argsort(-c, kind="stable")]
        total = float(c.sum())
        weights = [float(c[i] / total) if total > 0 else 1.0 / c.size for i in sel]
    else:
        sel = sorted(sel + joined, key=lambda i: (-c[i], i))
        total = float(c[sel].sum())
        weights = [float(c[i] / total) if total > 0 else 1.0 / len(sel) for i in sel]
    return RoutingDecision(
        confidences=[float(x) for x in c], c_S=float(c_S), t_C=t_C, selected=sel, weights=weights,
        fallback=fallback, crosstalk=pair, categories=list(categories), joined=joined,
    )


def decide_batch(
    confidences: np.ndarray,
    c_S: np.ndarray,
    policy: PolicyConfig,
    categories: Sequence[str] = (),
) -> list[RoutingDecision]:
    """:func:`decide` for a batch, vectorised over the arithmetic: ``(N, K), (N,) -> N decisions``.

    Equal to calling :func:`decide` row by row (tested).
    """
    c = np.asarray(confidences, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] == 0:
        raise ConfigError(f"confidences must have shape (N, K) with K >= 1, got {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ConfigError("confidences must be finite and >= 0")
    c_S = np.asarray(c_S, dtype=np.float64)
    t_C = threshold_batch(policy.t_C_base, policy.k, c_S)  # (N,)
    mask = select_batch(c, t_C)  # (N, K)
    fallback = ~mask.any(axis=1)  # (N,)
    pairs, trig = crosstalk_batch(c, policy.t_CT)  # (N, 2), (N,)
    join = np.zeros_like(mask)  # (N, K): pair members selected only for the dialogue
    if c.shape[1] >= 2:
        rows = np.flatnonzero(trig & ~fallback)
        for col in (0, 1):
            join[rows, pairs[rows, col]] = True
        join &= ~mask
    run = mask | join | fallback[:, None]  # (N, K) experts that run
    w = np.where(run, c, 0.0)
    tot = w.sum(axis=1, keepdims=True)
    w = np.divide(w, tot, out=np.full_like(w, 1.0 / c.shape[1]), where=tot > 0)
    order = np.argsort(-c, axis=1, kind="stable")  # (N, K)
    out = []
    for n in range(c.shape[0]):
        sel = [int(i) for i in order[n] if run[n, i]]
        out.append(
            RoutingDecision(
                confidences=c[n].tolist(), c_S=float(c_S[n]), t_C=float(t_C[n]), selected=sel,
                weights=[float(w[n, i]) for i in sel], fallback=bool(fallback[n]),
                crosstalk=(int(pairs[n, 0]), int(pairs[n, 1])) if trig[n] else None,
                categories=list(categories), joined=[int(i) for i in order[n] if join[n, i]],
            )
        )
    return out


def input_fallback(n_categories: int, reason: str, categories: Sequence[str] = (), t_C_base: float = 0.0) -> RoutingDecision:
    """The documented decision for an input the router cannot read (empty, or no known tokens).

    Every expert runs with uniform weights, confidences are uniform ``1/K``, ``c_S = 0``,
    ``t_C = t_C_base``, no cross-talk (the router has no evidence two experts disagree), and
    ``reason`` says why.
    """
    u = 1.0 / n_categories
    return RoutingDecision(
        confidences=[u] * n_categories, c_S=0.0, t_C=float(t_C_base), selected=list(range(n_categories)),
        weights=[u] * n_categories, fallback=True, crosstalk=None, categories=list(categories), reason=reason,
    )
