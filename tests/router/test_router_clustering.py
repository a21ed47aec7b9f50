"""Balanced spherical k-means: the greedy equals its loop twin, capacities hold, planted clusters are found."""

from __future__ import annotations

import numpy as np
import pytest

from taskmoe.errors import ConfigError, DataError
from taskmoe.router.clustering import (
    ClusteringConfig,
    assign_nearest,
    balanced_assign,
    balanced_assign_ref,
    capacity,
    choose_k,
    discover,
    spherical_kmeans,
)


def blobs(sizes: list[int], d: int = 16, spread: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.normal(size=(d, d)))[0][: len(sizes)]  # orthonormal directions
    x = np.concatenate([c + spread * rng.normal(size=(n, d)) for c, n in zip(centers, sizes)])
    y = np.concatenate([[i] * n for i, n in enumerate(sizes)])
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


@pytest.mark.parametrize("cap", [50, 51, 60, 200])
def test_balanced_assign_equals_loop_twin(cap: int) -> None:
    rng = np.random.default_rng(cap)
    s = np.round(rng.normal(size=(200, 4)), 1)  # rounding makes ties, which both break by (i, k)
    a = balanced_assign(s, cap)
    np.testing.assert_array_equal(a, balanced_assign_ref(s, cap))
    assert np.bincount(a, minlength=4).max() <= cap and (a >= 0).all()


def test_balanced_assign_hand_example() -> None:
    """Pairs by similarity: (0,A)=.9 taken, (1,A)=.8 taken (A full at cap 2), (2,A)=.7 refused -> (2,B)."""
    s = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6]])
    assert balanced_assign(s, 2).tolist() == [0, 0, 1]
    assert balanced_assign(s, 3).tolist() == [0, 0, 0]
    with pytest.raises(ConfigError):
        balanced_assign(s, 1)


def test_capacity() -> None:
    assert capacity(100, 4, 1.0) == 25 and capacity(101, 4, 1.0) == 26 and capacity(100, 4, 1.2) == 30
    assert capacity(100, 4, float("inf")) == 100


def test_kmeans_recovers_planted_clusters_and_balance_caps_sizes() -> None:
    from sklearn.metrics import normalized_mutual_info_score

    x, y = blobs([80, 80, 80, 80])
    res = spherical_kmeans(x, 4, ClusteringConfig(n_categories=4, balance=1.0))
    assert normalized_mutual_info_score(y, res.labels) == pytest.approx(1.0)
    assert np.bincount(res.labels).tolist() == [80, 80, 80, 80]
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(assign_nearest(x, res.centroids), res.labels)
    # an unequal truth: balance = 1 forces equal sizes, balance = inf recovers the truth
    x2, y2 = blobs([150, 50], spread=0.1)
    bal = spherical_kmeans(x2, 2, ClusteringConfig(n_categories=2, balance=1.0))
    assert np.bincount(bal.labels).tolist() == [100, 100]
    free = spherical_kmeans(x2, 2, ClusteringConfig(n_categories=2, balance=float("inf")))
    assert normalized_mutual_info_score(y2, free.labels) == pytest.approx(1.0)


def test_kmeans_is_deterministic() -> None:
    x, _ = blobs([40, 40, 40], spread=0.6, seed=3)
    cfg = ClusteringConfig(n_categories=3, seed=5)
    a, b = spherical_kmeans(x, 3, cfg), spherical_kmeans(x, 3, cfg)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_auto_chooses_k_by_silhouette_and_reports_scores() -> None:
    x, _ = blobs([60, 60, 60], spread=0.1)
    res = discover(x, ClusteringConfig(n_categories="auto", k_min=2, k_max=5))
    assert res.k == 3
    assert sorted(res.scores) == [2, 3, 4, 5] and max(res.scores, key=res.scores.get) == 3
    assert choose_k(x, ClusteringConfig(n_categories="auto", k_min=2, k_max=3)).k == 3


@pytest.mark.parametrize("kw", [{"n_categories": 0}, {"n_categories": "many"}, {"balance": 0.5}, {"k_min": 1}, {"k_min": 5, "k_max": 3}])
def test_config_validation(kw: dict) -> None:
    with pytest.raises(ConfigError):
        ClusteringConfig(**kw)


def test_too_few_vectors() -> None:
    with pytest.raises(DataError):
        spherical_kmeans(np.ones((2, 3)), 4, ClusteringConfig())
