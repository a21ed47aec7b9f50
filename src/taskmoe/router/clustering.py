"""Category discovery: balanced spherical k-means over encoder vectors, and choosing k.

Spherical k-means works on unit vectors with cosine similarity: the assignment step maximises
``x_i . c_k``, the update step sets ``c_k = normalize(sum of its members)``. Both steps can only
increase the objective ``sum_i x_i . c_a(i)``, so the loop converges.

Design choices:

- **Initialisation**: k-means++ (scikit-learn's ``kmeans_plusplus``) on the unit vectors; for
  unit vectors squared Euclidean distance is ``2 - 2 cos``, so this is k-means++ for cosine.
  ``n_init`` restarts, the best objective wins.
- **Balanced assignment** (:func:`balanced_assign`): each cluster holds at most
  ``capacity = ceil(balance * N / K)`` points. Capacity-constrained greedy: all ``(i, k)`` pairs
  are visited in decreasing similarity and a pair is taken when point ``i`` is still free and
  cluster ``k`` has room. With ``balance = 1`` clusters are equal to within one point; larger
  values allow that much imbalance; ``balance = inf`` is plain spherical k-means. Balance keeps
  one broad domain from swallowing two categories (and an expert from starving); the default
  corpus is capped per domain, so near-equal categories are the right prior there. The greedy
  is deterministic and exact for ``balance = inf``; :func:`balanced_assign_ref` is its plain
  loop twin.
- **Choosing k** (:func:`choose_k`): run the clustering for each ``k`` in a range and keep the
  one with the highest mean **silhouette** (cosine), computed on a fixed sample of at most
  ``silhouette_sample`` points (silhouette is quadratic in N). All scores are returned so the
  CLI can print them.

Glossary: ``X`` unit vectors ``(N, D)``, ``C`` centroids ``(K, D)``, ``S = X C^T`` similarities
``(N, K)``, ``a`` assignments ``(N,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from taskmoe.config import Config, check, check_min, doc
from taskmoe.errors import ConfigError, DataError


@dataclass
class ClusteringConfig(Config):
    """Balanced spherical k-means and the choice of the number of categories."""

    n_categories: int | str = doc(4, "number of categories n_C, or 'auto' to choose by silhouette in [k_min, k_max]")
    k_min: int = doc(2, "smallest n_C tried by 'auto'")
    k_max: int = doc(8, "largest n_C tried by 'auto'")
    balance: float = doc(1.1, "cluster capacity = ceil(balance * N / K); 1 = equal sizes, inf = unbalanced")
    n_init: int = doc(4, "k-means++ restarts; the best objective wins")
    max_iter: int = doc(50, "maximum assignment/update rounds per restart")
    silhouette_sample: int = doc(2000, "points used to score silhouette when choosing k")
    seed: int = doc(0, "random seed (initialisation and silhouette sample)")

    def validate(self) -> None:
        if isinstance(self.n_categories, str):
            check(self.n_categories == "auto", f"clustering.n_categories must be an int >= 1 or 'auto', got {self.n_categories!r}")
        else:
            check(isinstance(self.n_categories, int) and self.n_categories >= 1,
                  f"clustering.n_categories must be an int >= 1 or 'auto', got {self.n_categories!r}")
        check(2 <= self.k_min <= self.k_max, f"clustering: need 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        check(self.balance >= 1.0, f"clustering.balance must be >= 1 (or inf), got {self.balance}")
        check_min(self, ("n_init", "max_iter"), 1, owner="clustering")
        check_min(self, ("silhouette_sample",), 10, owner="clustering")


@dataclass
class ClusteringResult:
    """Centroids ``(K, D)`` (unit rows), training assignments ``(N,)``, objective, k-selection scores."""

    centroids: np.ndarray
    labels: np.ndarray
    objective: float
    n_iter: int
    scores: dict[int, float] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def capacity(n: int, k: int, balance: float) -> int:
    """``ceil(balance * n / k)``, at least ``ceil(n / k)`` so a feasible assignment exists."""
    if math.isinf(balance):
        return n
    return max(math.ceil(n / k), math.ceil(balance * n / k - 1e-9))


def balanced_assign(sim: np.ndarray, cap: int) -> np.ndarray:
    """Capacity-constrained greedy assignment: ``S (N, K), cap -> a (N,)``.

    Visit all pairs by decreasing ``S[i, k]`` (ties: lower ``i``, then lower ``k``); take the pair
    when point ``i`` is unassigned and cluster ``k`` has fewer than ``cap`` points.
    Requires ``cap * K >= N``.
    """
    n, k = sim.shape
    if cap * k < n:
        raise ConfigError(f"balanced_assign: capacity {cap} x {k} clusters cannot hold {n} points")
    order = np.lexsort((np.tile(np.arange(k), n), np.repeat(np.arange(n), k), -sim.ravel()))  # pairs by -S, i, k
    a = np.full(n, -1, dtype=np.int64)
    size = np.zeros(k, dtype=np.int64)
    left = n
    pi, pk = np.divmod(order, k)
    for i, c in zip(pi.tolist(), pk.tolist()):
        if a[i] < 0 and size[c] < cap:
            a[i] = c
            size[c] += 1
            left -= 1
            if left == 0:
                break
    return a


def balanced_assign_ref(sim: np.ndarray, cap: int) -> np.ndarray:
    """Plain-loop twin of :func:`balanced_assign` (sorts pairs with Python's ``sorted``)."""
    n, k = sim.shape
    pairs = sorted(((-float(sim[i, c]), i, c) for i in range(n) for c in range(k)))
    a = [-1] * n
    size = [0] * k
    for _, i, c in pairs:
        if a[i] < 0 and size[c] < cap:
            a[i] = c
            size[c] += 1
    return np.array(a, dtype=np.int64)


def spherical_kmeans(x: np.ndarray, k: int, cfg: ClusteringConfig) -> ClusteringResult:
    """Balanced spherical k-means with k-means++ restarts (see the module docstring)."""
    from sklearn.cluster import kmeans_plusplus

    x = _unit(np.asarray(x, dtype=np.float64))
    n = x.shape[0]
    if k < 1 or n < k:
        raise DataError(f"clustering: need at least k={k} vectors, got {n}")
    cap = capacity(n, k, cfg.balance)
    best: ClusteringResult | None = None
    for r in range(cfg.n_init):
        c, _ = kmeans_plusplus(x, k, random_state=cfg.seed * 1000 + r)
        c = _unit(c)
        a = np.full(n, -1, dtype=np.int64)
        it = 0
        for it in range(1, cfg.max_iter + 1):
            s = x @ c.T  # (N, K)
            a_new = balanced_assign(s, cap) if cap < n else s.argmax(1)
            if np.array_equal(a_new, a):
                break
            a = a_new
            for j in range(k):
                m = a == j
                # an empty cluster keeps its old centroid (only possible when unbalanced)
                if m.any():
                    c[j] = x[m].sum(0)
            c = _unit(c)
        obj = float(np.sum(x * c[a]))
        if best is None or obj > best.objective + 1e-12:
            best = ClusteringResult(centroids=c.astype(np.float32), labels=a, objective=obj, n_iter=it)
    assert best is not None
    return best


def silhouette(x: np.ndarray, labels: np.ndarray, sample: int, seed: int) -> float:
    """Mean cosine silhouette on a fixed random sample of at most ``sample`` points."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return -1.0
    return float(silhouette_score(x, labels, metric="cosine", sample_size=min(sample, len(x)), random_state=seed))


def choose_k(x: np.ndarray, cfg: ClusteringConfig) -> ClusteringResult:
    """Cluster for each ``k`` in ``[k_min, k_max]``; keep the highest silhouette (``scores`` has all)."""
    n = len(x)
    ks = [k for k in range(cfg.k_min, cfg.k_max + 1) if k < n]
    if not ks:
        raise DataError(f"clustering: too few vectors ({n}) to choose k in [{cfg.k_min}, {cfg.k_max}]")
    scores: dict[int, float] = {}
    results: dict[int, ClusteringResult] = {}
    for k in ks:
        results[k] = spherical_kmeans(x, k, cfg)
        scores[k] = silhouette(x, results[k].labels, cfg.silhouette_sample, cfg.seed)
    k_best = max(ks, key=lambda k: (scores[k], -k))
    res = results[k_best]
    res.scores = scores
    return res


def discover(x: np.ndarray, cfg: ClusteringConfig) -> ClusteringResult:
    """Discover categories: fixed ``n_categories`` or ``'auto'`` (:func:`choose_k`)."""
    if cfg.n_categories == "auto":
        return choose_k(x, cfg)
    res = spherical_kmeans(x, int(cfg.n_categories), cfg)
    return res


def assign_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid by cosine (unbalanced): ``(N, D), (K, D) -> (N,)``; used for validation labels."""
    return (_unit(np.asarray(x, dtype=np.float64)) @ np.asarray(centroids, dtype=np.float64).T).argmax(1)


def scores_table(scores: dict[int, float]) -> list[dict[str, Any]]:
    return [{"n_categories": k, "silhouette": round(v, 4)} for k, v in sorted(scores.items())]
