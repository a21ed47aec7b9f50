"""Interrupt policy: hand-computed values, documented edge cases, seeded sampling rate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmoe.crosstalk.policy import (
    InterruptConfig,
    InterruptState,
    interrupt_probability,
    interrupt_score,
    sample_interrupt,
)
from taskmoe.errors import ConfigError


def test_hand_computed_values() -> None:
    # C=0.8, alpha=1, T_since=e^2 (log = 2), I_recent=2, beta=0.5, shr=1:
    # score = 0.8^2 * 0.8 * 2 / (2 * 0.5) - 1 = 0.512 * 2 / 1 - 1 = 0.024
    cfg = InterruptConfig(alpha=1.0, beta=0.5, shr=1.0)
    s = interrupt_score(0.8, math.e**2, 2, alpha=1.0, beta=0.5, shr=1.0)
    assert s == pytest.approx(0.024)
    assert interrupt_probability(0.8, math.e**2, 2, cfg) == pytest.approx(1 / (1 + math.exp(-0.024)))
    # alpha=0 reduces to C^2: C=0.5, T_since=e, I_recent=1, beta=1, shr=0 -> 0.25 -> sigmoid(0.25)
    cfg0 = InterruptConfig(alpha=0.0, beta=1.0, shr=0.0)
    assert interrupt_probability(0.5, math.e, 1, cfg0) == pytest.approx(1 / (1 + math.exp(-0.25)))


def test_edge_cases() -> None:
    cfg = InterruptConfig(alpha=1.0, beta=1.0, shr=2.0)
    # T_since = 1: log term vanishes, P = sigmoid(-shr)
    assert interrupt_probability(0.9, 1, 3, cfg) == pytest.approx(1 / (1 + math.exp(2.0)))
    # I_recent = 0 is treated as 1 (documented), not a division by zero
    assert interrupt_probability(0.7, 5, 0, cfg) == interrupt_probability(0.7, 5, 1, cfg)
    # more consecutive interruptions -> lower probability
    assert interrupt_probability(0.9, 20, 3, cfg) < interrupt_probability(0.9, 20, 1, cfg)
    with pytest.raises(ValueError, match="T_since"):
        interrupt_probability(0.5, 0, 0, cfg)
    with pytest.raises(ValueError, match="confidence"):
        interrupt_probability(1.5, 2, 0, cfg)
    with pytest.raises(ConfigError, match="beta"):
        InterruptConfig(beta=0.0)
    with pytest.raises(ConfigError, match="squash"):
        InterruptConfig(squash="relu")


def test_squashes() -> None:
    s = interrupt_score(0.6, 10, 1, alpha=0.5, beta=2.0, shr=0.1)
    assert interrupt_probability(0.6, 10, 1, InterruptConfig(alpha=0.5, beta=2.0, shr=0.1, squash="tanh")) == pytest.approx(
        0.5 * (math.tanh(s) + 1)
    )
    assert interrupt_probability(0.6, 10, 1, InterruptConfig(alpha=0.5, beta=2.0, shr=0.1, squash="clip")) == pytest.approx(
        min(1.0, max(0.0, s))
    )


@settings(max_examples=200, deadline=None)
@given(
    c=st.floats(0, 1),
    t=st.floats(1, 1e6),
    i=st.integers(0, 50),
    alpha=st.floats(0, 5),
    beta=st.floats(1e-3, 10),
    shr=st.floats(-10, 10),
)
def test_probability_in_unit_interval_and_monotone_in_t_since(c, t, i, alpha, beta, shr) -> None:
    cfg = InterruptConfig(alpha=alpha, beta=beta, shr=shr)
    p = interrupt_probability(c, t, i, cfg)
    assert 0.0 <= p <= 1.0
    assert interrupt_probability(c, t * 2, i, cfg) >= p  # waiting longer never lowers P


def test_seeded_sampling_rate_matches_probability() -> None:
    cfg = InterruptConfig(alpha=1.0, beta=1.0, shr=1.0)
    p = interrupt_probability(0.9, 8, 1, cfg)
    g = torch.Generator().manual_seed(1234)
    n = 20000
    hits = sum(sample_interrupt(p, g) for _ in range(n))
    # binomial standard error sqrt(p(1-p)/n) ~ 0.0035; allow 4 sigma
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    g2 = torch.Generator().manual_seed(1234)
    g3 = torch.Generator().manual_seed(1234)
    assert [sample_interrupt(p, g2) for _ in range(50)] == [sample_interrupt(p, g3) for _ in range(50)]


def test_state_transitions() -> None:
    s = InterruptState(t_since=4, i_recent=0)
    s1 = s.after(True)
    assert (s1.t_since, s1.i_recent) == (1, 1)
    s2 = s1.after(True)
    assert (s2.t_since, s2.i_recent) == (1, 2)
    s3 = s2.after(False)
    assert (s3.t_since, s3.i_recent) == (2, 0)
