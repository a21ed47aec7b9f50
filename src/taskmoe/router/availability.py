"""Routing around categories that have no expert (pruned in training): pure functions.

A run whose training pruned an expert keeps the router's categories as they were; the pruned
category is *unavailable*. The router then routes with the conditional distribution over the
available categories,

    c'_j = c_j * a_j / sum_i c_i * a_i        (a_j = 1 if category j has an expert, else 0)

(uniform over the available ones when that sum is 0), so the policy (threshold, selection,
fallback, cross-talk) runs unchanged on ``c'`` and a pruned category's share goes to the
remaining experts in proportion to their confidence. :func:`without` then removes unavailable
categories from a decision that still names them (a fallback runs "every expert": every
*available* one), renormalising the weights and dropping a cross-talk pair that touches one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Collection

import numpy as np

from taskmoe.router.policy import RoutingDecision


def restrict(confidences: np.ndarray, unavailable: Collection[int]) -> np.ndarray:
    """``(N, K)`` confidences conditioned on the available categories (module docstring)."""
    c = np.asarray(confidences, dtype=np.float64)
    if not unavailable:
        return c
    keep = np.ones(c.shape[-1], dtype=bool)
    keep[list(unavailable)] = False
    masked = np.where(keep, c, 0.0)  # (N, K)
    tot = masked.sum(-1, keepdims=True)
    uniform = np.broadcast_to(keep / keep.sum(), masked.shape)
    return np.where(tot > 0, masked / np.where(tot > 0, tot, 1.0), uniform)


def without(decision: RoutingDecision, unavailable: Collection[int]) -> RoutingDecision:
    """``decision`` with every unavailable category removed from ``selected`` (module docstring)."""
    if not unavailable or not set(decision.selected) & set(unavailable):
        return decision
    kept = [(s, w) for s, w in zip(decision.selected, decision.weights) if s not in unavailable]
    total = sum(w for _, w in kept)
    weights = [w / total if total > 0 else 1.0 / len(kept) for _, w in kept]
    pair = decision.crosstalk
    if pair is not None and (pair[0] in unavailable or pair[1] in unavailable):
        pair = None
    return replace(decision, selected=[s for s, _ in kept], weights=weights, crosstalk=pair,
                   joined=[j for j in decision.joined if j not in unavailable])
