"""Label classification from log-probabilities: contextual calibration, balanced accuracy, bootstrap CI.

Glossary: ``s`` ``(N, K)`` label log-probabilities ``log p(label_k | prompt_n)`` (unnormalised
over the K labels), ``s_cf`` ``(M, K)`` the same for M *content-free* prompts (the item text
replaced by "N/A", "" or "[MASK]").

- :func:`label_probs`: ``p_nk = softmax_k(s_nk)``, the distribution restricted to the K labels.
- :func:`calibrate` ("Calibrate Before Use", Zhao et al. 2021, contextual calibration): the mean
  content-free distribution ``p_cf = (1/M) sum_m softmax(s_cf_m)`` estimates the prompt's bias;
  the calibrated distribution is ``q_n ∝ p_n / p_cf`` (their ``W = diag(p_cf)^-1``, ``b = 0``), so
  a model that gives one label to every item because of the prompt is judged on how each item
  moves it relative to a content-free input.
- :func:`balanced_accuracy`: the mean over classes present in ``gold`` of the recall
  ``#{pred = gold = k} / #{gold = k}``; constant predictions score exactly ``1 / K_present``.
- :func:`bootstrap_ci`: percentile interval of the balanced accuracy over ``n`` resamples of the
  items with replacement (seeded; resamples missing a class use the classes they hold).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["label_probs", "calibrate", "balanced_accuracy", "bootstrap_ci", "classification_report"]


def label_probs(scores: torch.Tensor) -> torch.Tensor:
    """``softmax`` over the label axis of ``(N, K)`` scores (float64)."""
    return torch.softmax(scores.double(), dim=-1)


def calibrate(scores: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Calibrated label distribution ``q_n ∝ p_n / p_cf`` (module docstring), ``(N, K)``."""
    p_cf = label_probs(content_free).mean(dim=0)  # (K,)
    q = label_probs(scores) / p_cf
    return q / q.sum(dim=-1, keepdim=True)


def balanced_accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Mean per-class recall over the classes present in ``gold``."""
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"balanced_accuracy: {len(pred)} predictions for {len(gold)} labels")
    recalls = []
    for k in sorted(set(gold)):
        idx = [i for i, g in enumerate(gold) if g == k]
        recalls.append(sum(pred[i] == k for i in idx) / len(idx))
    return sum(recalls) / len(recalls)


def bootstrap_ci(pred: Sequence[int], gold: Sequence[int], n: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`balanced_accuracy` (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    N = len(gold)
    stats = []
    for _ in range(n):
        idx = torch.randint(0, N, (N,), generator=g).tolist()
        stats.append(balanced_accuracy([pred[i] for i in idx], [gold[i] for i in idx]))
    stats.sort()
    lo = stats[max(0, math.floor((1 - level) / 2 * n))]
    hi = stats[min(n - 1, math.ceil((1 + level) / 2 * n) - 1)]
    return lo, hi


def classification_report(probs: torch.Tensor, gold: Sequence[int], labels: Sequence[str], *, n_boot: int = 1000,
                          seed: int = 0) -> dict[str, object]:
    """Balanced accuracy with its 95% CI, accuracy, and the share of each predicted label."""
    pred = probs.argmax(dim=-1).tolist()
    lo, hi = bootstrap_ci(pred, list(gold), n=n_boot, seed=seed)
    return {
        "balanced_accuracy": balanced_accuracy(pred, list(gold)),
        "ci95": [lo, hi],
        "accuracy": sum(p == y for p, y in zip(pred, gold)) / len(gold),
        "predicted_share": {lab: pred.count(k) / len(pred) for k, lab in enumerate(labels)},
    }
