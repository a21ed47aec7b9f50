"""Intent head contracts: labels from domains, the torch head reproduces scikit-learn's
probabilities (binary and multinomial), it separates separable intents, round-trips on disk, and
pooled features do not depend on batching/padding."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from taskmoe.errors import CheckpointError, DataError
from taskmoe.summarizer.intent import IntentClassifier, domain_intents, pooled_hidden


def blobs(n: int, centers: list[list[float]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 1.0, size=(n, len(c))) for c in centers])
    y = np.repeat(np.arange(len(centers)), n)
    return x.astype(np.float32), y


def test_domain_intents() -> None:
    assert domain_intents(["code", "legal", None, "conversation"]) == ["code", "other", "other", "other"]
    assert domain_intents(["code", "legal"], {"legal": "law", "code": "code"}) == ["code", "law"]


@pytest.mark.parametrize("k", [2, 3])
def test_head_matches_sklearn(k: int) -> None:
    from sklearn.linear_model import LogisticRegression

    centers = [[2.0, 0.0, 1.0], [-2.0, 1.0, 0.0], [0.0, -2.0, 3.0]][:k]
    x, y = blobs(40, centers)
    labels = ["code", "other", "chat"][:k]
    clf = IntentClassifier(labels, dim=3, C=0.5).fit(x, [labels[i] for i in y])
    z = (x - x.mean(0)) / x.std(0)
    ref = LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000, random_state=0).fit(z.astype(np.float64), y)
    got = clf(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(got, ref.predict_proba(z), atol=1e-4)


def test_accuracy_on_separable_intents_and_probs_sum_to_one() -> None:
    x, y = blobs(50, [[3.0] * 4, [-3.0] * 4])
    lab = ["code" if i == 0 else "other" for i in y]
    clf = IntentClassifier(["code", "other"], dim=4).fit(x, lab)
    assert clf.accuracy(x, lab) == 1.0
    res = clf.predict(x[:3])
    assert res[0].label == "code" and sum(res[0].probs.values()) == pytest.approx(1.0)


def test_single_intent_and_width_errors() -> None:
    clf = IntentClassifier(["code", "other"], dim=2)
    with pytest.raises(DataError, match="only \\['other'\\]"):
        clf.fit(np.zeros((4, 2)), ["other"] * 4)
    with pytest.raises(DataError, match="width 3"):
        clf.fit(np.zeros((4, 3)), ["code", "other"] * 2)


def test_save_load_round_trip(tmp_path) -> None:
    x, y = blobs(20, [[1.0, 2.0], [-1.0, 0.0]])
    lab = ["code" if i == 0 else "other" for i in y]
    clf = IntentClassifier(["code", "other"], dim=2, feature="router_embedding").fit(x, lab)
    clf.save(tmp_path / "intent")
    back = IntentClassifier.load(tmp_path / "intent")
    assert back.labels == ["code", "other"] and back.feature == "router_embedding"
    assert torch.equal(back(torch.from_numpy(x)), clf(torch.from_numpy(x)))
    with pytest.raises(CheckpointError):
        IntentClassifier.load(tmp_path / "missing")


class CumMean(nn.Module):
    """A causal toy LM: hidden[t] = mean of the embeddings of tokens 0..t."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 5)

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        e = self.embed(ids)  # (B, T, D)
        n = torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return SimpleNamespace(hidden=e.cumsum(1) / n)


def test_pooled_hidden_ignores_padding_and_batching() -> None:
    m = CumMean()
    seqs = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    together = pooled_hidden(m, seqs, pad_id=0, batch_size=3)
    alone = torch.cat([pooled_hidden(m, [s]) for s in seqs])
    torch.testing.assert_close(together, alone)
    e = m.embed.weight.detach()
    # hand: mean over t of cumulative means for [1, 2, 3] = (e1 + (e1+e2)/2 + (e1+e2+e3)/3) / 3
    torch.testing.assert_close(together[0], (e[1] + (e[1] + e[2]) / 2 + (e[1] + e[2] + e[3]) / 3) / 3)
