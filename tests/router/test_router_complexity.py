"""Complexity scorer: features by hand, the bigram target, the stored LR equals sklearn, user labels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from router_helpers import SPECIAL, V, corpus
from taskmoe.errors import DataError
from taskmoe.router.complexity import FEATURES, BigramLM, ComplexityConfig, ComplexityScorer, default_target, features, token_table
from taskmoe.router.vocab import VocabStats


def test_features_by_hand() -> None:
    """Corpus [[1,1,2]] (V=4): counts (0,2,1,0), N=3; add-one p = (1,3,2,1)/7; df = (0,1,1,0), D = 1."""
    stats = VocabStats.from_sequences([[1, 1, 2]], 4)
    table = np.array([[1, 0, 0], [3, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=np.float32)  # chars, digit, punct
    f = features([[1, 2, 3, 3], []], stats, table)
    s = -np.log(np.array([1, 3, 2, 1]) / 7)
    sp = s[[1, 2, 3, 3]]
    idf = np.log(2 / np.array([1, 2, 2, 1])) + 1
    expected = [math.log(5), 3 / 4, sp.mean(), sp.std(), idf[[1, 2, 3, 3]].mean(), 2 / 4, 6 / 4, 3 / 4, 1 / 4, 2 / 4]
    np.testing.assert_allclose(f[0], expected, rtol=1e-6)
    assert not f[1].any() and len(FEATURES) == f.shape[1]


def test_bigram_nll_by_hand() -> None:
    """Fit [[1,2],[1,3]] (V=4): p_uni = (1,3,2,2)/8; c(1)=2, c(1,2)=1.

    nll([1,2]) = -(log p_uni(1) + log(0.7 * 1/2 + 0.3 * p_uni(2))) / 2.
    """
    lm = BigramLM([[1, 2], [1, 3]], 4, 0.7)
    want = -(math.log(3 / 8) + math.log(0.7 * 0.5 + 0.3 * 2 / 8)) / 2
    assert lm.nll([1, 2]) == pytest.approx(want)
    # context 2 never seen: the unigram alone
    assert lm.nll([2, 1]) == pytest.approx(-(math.log(2 / 8) + math.log(3 / 8)) / 2)


def test_default_target_is_half_per_group() -> None:
    docs, labels = corpus([0, 1], 30)
    y, losses = default_target(docs, V, np.array(labels), 0.7)
    for g in (0, 1):
        m = np.array(labels) == g
        assert y[m].sum() == m.sum() // 2
        assert (losses[m][y[m] == 1].min() > np.median(losses[m]))


def test_scorer_equals_sklearn_and_round_trips() -> None:
    docs, labels = corpus([0, 1, 2], 40, lengths=(10, 200))
    stats = VocabStats.from_sequences(docs, V, SPECIAL)
    scorer, info = ComplexityScorer.fit(docs, stats, ComplexityConfig(), groups=np.array(labels))
    f = features(docs, stats, scorer.table)
    np.testing.assert_allclose(scorer.score(docs), scorer._sk.predict_proba((f - scorer.mean) / scorer.scale)[:, 1], atol=1e-12)
    c = scorer.score(docs)
    assert ((c >= 0) & (c <= 1)).all() and info["train_acc"] > 0.6
    back = ComplexityScorer.from_tensors(scorer.tensors())
    np.testing.assert_array_equal(back.score(docs), c)


def test_user_labels_replace_the_default_target() -> None:
    docs, _ = corpus([0], 60, lengths=(10, 200))
    stats = VocabStats.from_sequences(docs, V, SPECIAL)
    long = np.array([len(d) > 100 for d in docs]).astype(int)  # "complex" = long, a learnable rule
    scorer, info = ComplexityScorer.fit(docs, stats, ComplexityConfig(), labels=long)
    assert info["target"] == "user labels" and info["train_acc"] > 0.95
    assert scorer.score([docs[int(np.argmax([len(d) for d in docs]))]])[0] > 0.5
    with pytest.raises(DataError, match="0 or 1"):
        ComplexityScorer.fit(docs, stats, ComplexityConfig(), labels=long * 2)
    with pytest.raises(DataError, match="labels"):
        ComplexityScorer.fit(docs, stats, ComplexityConfig(), labels=long[:5])
    with pytest.raises(DataError, match="single class"):
        ComplexityScorer.fit(docs, stats, ComplexityConfig(), labels=np.zeros(len(docs), dtype=int))


def test_token_table_from_decode() -> None:
    vocab = {0: "ab", 1: "42", 2: ",", 3: " x"}
    t = token_table(lambda ids: vocab[ids[0]], 4)
    assert t.tolist() == [[2, 0, 0], [2, 1, 0], [1, 0, 1], [2, 0, 0]]
