"""Disagreement contracts: the formulas on hand-worked inputs, the least-similar pair is named,
planted conflicts score above agreements, the clarification names experts and keywords, and the
threshold calibration reports precision/recall correctly."""

from __future__ import annotations

import numpy as np
import pytest

from taskmoe.errors import ConfigError, DataError
from taskmoe.summarizer.disagreement import (
    DisagreementConfig,
    assess,
    calibrate_threshold,
    clarification,
    disagreement_score,
    intent_consistency,
    keywords,
    precision_recall,
    semantic_agreement,
)


def test_semantic_agreement_hand_values() -> None:
    cos = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, -0.5], [0.0, -0.5, 1.0]])
    assert semantic_agreement(cos, [1, 1, 1]) == pytest.approx(0.8 / 3)
    # weights (1, 1, 0.5): pairs w = 1, 0.5, 0.5 -> (0.8 * 1) / 2
    assert semantic_agreement(cos, [1, 1, 0.5]) == pytest.approx(0.4)
    assert semantic_agreement(np.ones((1, 1)), [0.3]) == 1.0


def test_intent_consistency_hand_values() -> None:
    p = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert intent_consistency(p, [1, 1]) == pytest.approx(0.0)
    assert intent_consistency(p[:1], [1], np.array([0.5, 0.5])) == pytest.approx(0.5)
    # pair TV 1, prompt TVs (0, 1) weighted (3, 1) -> 0.25; S = 1 - mean(1, 0.25)
    assert intent_consistency(p, [3, 1], np.array([1.0, 0.0])) == pytest.approx(1 - 0.625)
    assert intent_consistency(None, [1, 1]) == 1.0
    assert disagreement_score(0.5, 1.0, 0.7) == pytest.approx(0.35)


def onehot_encoder(table: dict[int, list[float]]):
    """Encode a draft as the vector of its first token (a stand-in for the router encoder)."""
    return lambda seqs: np.array([table[s[0]] for s in seqs], dtype=np.float32)


def test_assess_names_least_similar_pair_and_flags_conflict() -> None:
    enc = onehot_encoder({1: [1, 0, 0], 2: [0.9, 0.1, 0], 3: [0, 0, 1]})
    cfg = DisagreementConfig(threshold=0.4)
    agree = assess(["a", "b"], [0.6, 0.4], [[1], [2]], enc, cfg)
    conflict = assess(["a", "b", "c"], [0.5, 0.3, 0.2], [[1], [2], [3]], enc, cfg)
    cos_ab = 0.9 / np.hypot(0.9, 0.1)
    # no intent head: D = 1 - S_sem, pair weights .15 (a,b), .10 (a,c), .06 (b,c)
    assert agree.score == pytest.approx(1 - cos_ab, abs=1e-6)
    assert conflict.score == pytest.approx(1 - 0.15 * cos_ab / 0.31, abs=1e-6)
    assert not agree.clarify and conflict.clarify
    assert conflict.conflict == ("a", "c")  # cosine 0 is the lowest pair
    d = conflict.to_dict()
    assert d["clarify"] is True and d["experts"] == ["a", "b", "c"]


def test_unreadable_draft_is_left_out() -> None:
    enc = lambda seqs: np.array([[1.0, 0.0] if s else [0.0, 0.0] for s in seqs])  # noqa: E731
    rep = assess(["a", "b", "c"], [0.5, 0.3, 0.2], [[1], [1], []], enc)
    assert rep.semantic_agreement == pytest.approx(1.0) and rep.conflict == ("a", "b")
    assert assess(["a", "c"], [0.5, 0.5], [[1], []], enc).score == pytest.approx(0.0)


def test_assess_with_intents_and_off_track_single_draft() -> None:
    enc = onehot_encoder({1: [1, 0], 5: [0, 1]})
    probs = lambda seqs: np.array([[0.9, 0.1] if s[0] == 1 else [0.1, 0.9] for s in seqs])  # noqa: E731
    rep = assess(["code"], [1.0], [[1]], enc, DisagreementConfig(threshold=0.2), intent_probs=probs,
                 intent_labels=["code", "other"], prompt_ids=[5])
    assert rep.intents == ["code"] and rep.prompt_intent == "other"
    assert rep.intent_consistency == pytest.approx(1 - 0.8)
    assert rep.score == pytest.approx(0.3 * 0.8) and rep.clarify
    assert rep.conflict == ("code", "code")
    q = clarification(rep, {"code": "def foo return foo"}, {"code": 1.0})
    assert "'other'" in q and "'code' expert" in q and "foo" in q


def test_assess_input_errors() -> None:
    enc = onehot_encoder({1: [1.0]})
    with pytest.raises(DataError, match="2 experts, 1 confidences"):
        assess(["a", "b"], [1.0], [[1], [1]], enc)
    with pytest.raises(ConfigError):
        DisagreementConfig(threshold=1.5)


def test_keywords_are_distinctive() -> None:
    kw = keywords(["licence licence warranty the court", "def return return licence"], n=2)
    # licence: 2 - 1 = 1 (count 2) ties court/warranty (1, count 1) and wins on count
    assert kw == [["licence", "court"], ["return", "def"]]


def test_clarification_names_both_experts() -> None:
    enc = onehot_encoder({1: [1, 0], 2: [0, 1]})
    rep = assess(["legal", "literature"], [0.7, 0.3], [[1], [2]], enc)
    q = clarification(rep, {"legal": "the licensee warranty warranty", "literature": "thou art my lord"},
                      {"legal": 0.7, "literature": 0.3}, topics={"legal": "licences"})
    assert "'legal' expert (licences), confidence 0.70" in q and "warranty" in q
    assert "'literature' expert, confidence 0.30" in q and "lord" in q
    agree = assess(["x"], [1.0], [[1]], enc)
    with pytest.raises(ConfigError, match="no conflict"):
        clarification(agree, {}, {})


def test_precision_recall_and_calibration() -> None:
    scores = [0.1, 0.2, 0.35, 0.6, 0.7, 0.9]
    y = [False, False, True, False, True, True]
    assert precision_recall(scores, y, 0.5) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    best = calibrate_threshold(scores, y)
    # t=0.275 flags 4 (3 right): p=.75 r=1 f1=.857 beats t=0.5 (f1 .667) and t=0.65 (p=1, r=2/3, f1=.8)
    assert best["threshold"] == pytest.approx(0.275)
    assert best["precision"] == pytest.approx(0.75) and best["recall"] == 1.0
    with pytest.raises(DataError):
        calibrate_threshold([0.1, 0.2], [True, True])
