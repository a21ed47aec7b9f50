"""The routing policy with hand-computed values.

t_C = t_C_base * (1 - ln(1 + k c_S) / ln(1 + k)); with t_C_base = 0.3, k = 10:
  c_S = 0   -> 0.3
  c_S = 0.5 -> 0.3 * (1 - ln 6 / ln 11) = 0.3 * (1 - 1.7917595 / 2.3978953) = 0.3 * 0.2527784 = 0.0758335
  c_S = 1   -> 0.3 * (1 - 1) = 0
and with k = 1, c_S = 0.5: 0.3 * (1 - ln 1.5 / ln 2) = 0.3 * 0.4150375 = 0.1245113.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmoe.errors import ConfigError
from taskmoe.router.policy import (
    PolicyConfig,
    crosstalk_batch,
    crosstalk_pair,
    decide,
    decide_batch,
    input_fallback,
    select,
    threshold,
    threshold_batch,
)


@pytest.mark.parametrize(
    "t_base,k,c_S,expected",
    [(0.3, 10, 0.0, 0.3), (0.3, 10, 0.5, 0.0758335), (0.3, 10, 1.0, 0.0), (0.3, 1, 0.5, 0.1245113), (0.5, 10, 0.0, 0.5)],
)
def test_threshold_hand_values(t_base: float, k: float, c_S: float, expected: float) -> None:
    assert threshold(t_base, k, c_S) == pytest.approx(expected, abs=1e-7)
    assert threshold_batch(t_base, k, np.array([c_S]))[0] == pytest.approx(expected, abs=1e-7)


def test_threshold_endpoints_are_exact() -> None:
    assert threshold(0.3, 10, 0.0) == 0.3
    assert threshold(0.3, 10, 1.0) == 0.0
    assert threshold(0.3, 1e-6, 0.5) == pytest.approx(0.15, abs=1e-6)  # k -> 0: linear fall


@pytest.mark.parametrize("k,c_S", [(0, 0.5), (-1, 0.5), (math.inf, 0.5), (10, -0.1), (10, 1.1), (10, math.nan)])
def test_threshold_rejects_bad_k_and_c_S(k: float, c_S: float) -> None:
    with pytest.raises(ConfigError):
        threshold(0.3, k, c_S)


def test_threshold_batch_rejects_out_of_range() -> None:
    with pytest.raises(ConfigError, match="c_S"):
        threshold_batch(0.3, 10, np.array([0.2, 1.5]))


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0.01, 100))
def test_threshold_falls_with_complexity(a: float, b: float, k: float) -> None:
    lo, hi = min(a, b), max(a, b)
    assert 0.0 <= threshold(0.3, k, hi) <= threshold(0.3, k, lo) + 1e-12 <= 0.3 + 1e-12


def test_multi_selection_and_weights() -> None:
    c = [0.5, 0.35, 0.1, 0.05]
    assert select(c, 0.3) == [0, 1]
    d = decide(c, 0.0, PolicyConfig(t_C_base=0.3, k=10, t_CT=0.1))
    assert d.selected == [0, 1] and not d.fallback
    assert d.weights == pytest.approx([0.5 / 0.85, 0.35 / 0.85])
    assert d.crosstalk is None  # gap 0.15 > 0.1


def test_selection_is_strict_and_ordered_by_confidence() -> None:
    assert select([0.3, 0.7], 0.3) == [1]
    assert select([0.2, 0.5, 0.3], 0.1) == [1, 2, 0]


def test_complexity_lowers_the_threshold_and_selects_more() -> None:
    c = [0.6, 0.25, 0.1, 0.05]
    pol = PolicyConfig(t_C_base=0.3, k=10, t_CT=0.05)
    assert decide(c, 0.0, pol).selected == [0]
    assert decide(c, 0.5, pol).selected == [0, 1, 2]  # t_C = 0.0758
    assert decide(c, 1.0, pol).selected == [0, 1, 2, 3]  # t_C = 0: every non-zero confidence


def test_fallback_runs_all_experts_with_confidence_weights() -> None:
    c = [0.28, 0.27, 0.25, 0.2]
    d = decide(c, 0.0, PolicyConfig(t_C_base=0.3, k=10, t_CT=0.0))
    assert d.fallback
    assert d.selected == [0, 1, 2, 3]
    assert d.weights == pytest.approx(c)
    assert d.crosstalk is None  # gap 0.01 > t_CT = 0


def test_crosstalk_boundary_is_inclusive() -> None:
    assert crosstalk_pair([0.55, 0.45, 0.0], 0.1) == (0, 1)  # gap exactly t_CT
    assert crosstalk_pair(np.array([0.55, 0.45], dtype=np.float32), 0.1) == (0, 1)
    assert crosstalk_pair([0.45, 0.1, 0.45], 0.0) == (0, 2)  # a tie is within 0; lower index first
    assert crosstalk_pair([0.56, 0.44], 0.1) is None  # gap 0.12
    assert crosstalk_pair([0.5500021, 0.45], 0.1) is None  # just past the 1e-6 tolerance
    assert crosstalk_pair([1.0], 0.5) is None  # one category cannot talk


def test_crosstalk_as_the_seed_says_the_second_speaker_joins() -> None:
    """Scores (0.34, 0.29, 0.2, 0.17), c_S = 0 so t_C = t_C_base = 0.3, t_CT = 0.1: only 0.34 passes
    t_C, but the top two are 0.05 <= 0.1 apart, so cross-talk triggers and category 1 joins; the
    weights are renormalised over both: 0.34 / 0.63 and 0.29 / 0.63."""
    pol = PolicyConfig(t_C_base=0.3, k=10, t_CT=0.1)
    c = [0.34, 0.29, 0.2, 0.17]
    for d in (decide(c, 0.0, pol), decide_batch(np.array([c]), np.array([0.0]), pol)[0]):
        assert d.crosstalk == (0, 1) and d.selected == [0, 1] and d.joined == [1] and not d.fallback
        assert d.weights == pytest.approx([0.34 / 0.63, 0.29 / 0.63])
        assert d.to_dict()["joined"] == [1]
    d = decide([0.29, 0.34, 0.2, 0.17], 0.0, pol)  # the order of the categories does not matter
    assert d.crosstalk == (1, 0) and d.selected == [1, 0] and d.joined == [0]
    d = decide([0.5, 0.25, 0.25], 0.0, PolicyConfig(t_C_base=0.3, k=10, t_CT=0.3))  # gap 0.25 <= 0.3
    assert d.selected == [0, 1] and d.crosstalk == (0, 1) and d.joined == [1]
    d = decide([0.45, 0.4, 0.15], 0.0, PolicyConfig(t_C_base=0.3, k=10, t_CT=0.3))  # both pass: nobody joins
    assert d.selected == [0, 1] and d.crosstalk == (0, 1) and d.joined == []
    d = decide([0.34, 0.2, 0.23, 0.23], 0.0, pol)  # gap 0.11 > t_CT: no cross-talk, nobody joins
    assert d.selected == [0] and d.crosstalk is None and d.joined == []


def test_decide_batch_equals_rowwise() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 5)) * rng.uniform(0.1, 4, size=(200, 1))
    conf = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    c_S = rng.uniform(0, 1, 200)
    pol = PolicyConfig(t_C_base=0.35, k=5, t_CT=0.15)
    batch = decide_batch(conf, c_S, pol, [f"c{i}" for i in range(5)])
    assert any(d.fallback for d in batch) and any(d.crosstalk for d in batch) and any(len(d.selected) > 1 for d in batch)
    assert any(d.joined for d in batch)
    for row, b in zip(range(200), batch):
        d = decide(conf[row], c_S[row], pol, [f"c{i}" for i in range(5)])
        assert (d.selected, d.fallback, d.crosstalk, d.joined) == (b.selected, b.fallback, b.crosstalk, b.joined)
        assert d.weights == pytest.approx(b.weights) and d.t_C == pytest.approx(b.t_C)
    pairs, trig = crosstalk_batch(conf, 0.15)
    assert [tuple(p) if t else None for p, t in zip(pairs.tolist(), trig)] == [crosstalk_pair(c, 0.15) for c in conf]


def test_input_fallback_and_decision_dict() -> None:
    d = input_fallback(4, "empty input", ["a", "b", "c", "d"], 0.3)
    assert d.fallback and d.selected == [0, 1, 2, 3] and d.weights == [0.25] * 4 and d.crosstalk is None
    assert d.to_dict()["reason"] == "empty input"
    assert decide([0.7, 0.3], 0.0, PolicyConfig(), ["x", "y"]).selected_names == ["x"]


@pytest.mark.parametrize("field,value", [("t_C_base", 1.5), ("k", 0.0), ("k", -2.0), ("t_CT", -0.1)])
def test_policy_config_validation(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        PolicyConfig(**{field: value})


def test_bad_confidences_raise() -> None:
    with pytest.raises(ConfigError):
        select([], 0.3)
    with pytest.raises(ConfigError):
        decide([0.5, math.nan], 0.0, PolicyConfig())


def test_public_api_is_pinned() -> None:
    """Other areas (experts, pipeline, serving) build on these names and signatures."""
    import inspect

    import taskmoe.router as R

    assert set(R.__all__) >= {"Router", "RouterConfig", "RoutingDecision", "PolicyConfig", "fit_router", "threshold",
                              "select", "decide", "decide_batch", "crosstalk_pair", "load_shared_embedding"}  # fmt: skip
    assert list(inspect.signature(R.threshold).parameters) == ["t_C_base", "k", "c_S"]
    assert list(inspect.signature(R.Router.route).parameters) == ["self", "ids"]
    assert list(inspect.signature(R.Router.add_category).parameters) == ["self", "name", "seqs", "description"]
    fields = [f for f in R.RoutingDecision.__dataclass_fields__]
    assert fields[:7] == ["confidences", "c_S", "t_C", "selected", "weights", "fallback", "crosstalk"]
