"""Sampling functions: hand-derived values and seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from taskmoe.inference.sampling import (apply_temperature, greedy, repetition_penalty, sample, seen_mask,
                                        top_k_filter, top_p_filter)

NEG = float("-inf")


def test_greedy_ties_go_to_lowest_id() -> None:
    assert greedy(torch.tensor([[1.0, 3.0, 3.0], [0.0, -1.0, 0.0]])).tolist() == [1, 0]


def test_repetition_penalty_ctrl_rule() -> None:
    """r = 2: seen positive 2 -> 1, seen negative -2 -> -4, unseen 1 stays 1."""
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = seen_mask([[0, 1, 1]], 3)
    assert seen.tolist() == [[True, True, False]]
    assert repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    assert repetition_penalty(logits, seen, 1.0) is logits


def test_temperature() -> None:
    assert apply_temperature(torch.tensor([2.0, 4.0]), 2.0).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(torch.tensor([1.0]), 0.0)


def test_top_k_keeps_exactly_k() -> None:
    out = top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    assert out.tolist() == [[NEG, 3.0, 2.0, NEG]]
    assert top_k_filter(torch.tensor([[1.0, 2.0]]), 0).tolist() == [[1.0, 2.0]]


def test_top_p_nucleus() -> None:
    """probs (0.5, 0.3, 0.15, 0.05): mass before each = 0, 0.5, 0.8, 0.95.

    p = 0.7 keeps the first two (0 and 0.5 < 0.7); p = 0.5 keeps only the first (0.5 is not < 0.5).
    """
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_seeded_sampling_is_reproducible_and_follows_probs() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    a = sample(logits, generator=torch.Generator().manual_seed(7))
    b = sample(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    # 5 standard errors of a binomial proportion with n = 20000
    assert (freq - probs).abs().max() < 5 * math.sqrt(0.25 / 20000)


def test_filters_restrict_the_draw() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]]).expand(500, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=g).tolist()) <= {1, 2}
    assert set(sample(logits, top_k=1, generator=g).tolist()) == {1}
    assert sample(logits, temperature=0.0).tolist() == [1] * 500


def test_degenerate_top_p_and_temperature_never_produce_nan() -> None:
    """A top_p that rounds to 0 keeps the argmax; a tiny temperature behaves like greedy."""
    from taskmoe.inference.sampling import sample

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert sample(logits, top_p=5e-324, generator=g).tolist() == [1, 0]
        assert sample(logits, temperature=1e-30, generator=g).tolist() == [1, 0]
