"""Router on synthetic topic corpora: fit, batched routing, save/load, bad input, adding a category."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from router_helpers import SPECIAL, UNSEEN, V, corpus, loop_trainer, one_thread  # noqa: F401
from taskmoe.errors import CheckpointError, ConfigError, DataError
from taskmoe.router import Router, RouterConfig, fit_router, load_shared_embedding
from taskmoe.router.classifier import ClassifierConfig
from taskmoe.router.clustering import ClusteringConfig
from taskmoe.router.encoders import LearnedEncoder, LearnedEncoderConfig, NotFittedError, TfidfEncoderConfig
from taskmoe.router.policy import RoutingDecision

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTokenizer:
    """Just what the router needs from a tokenizer (no files): special ids, decode, vocab size."""

    vocab_size = V
    special_ids = {f"<s{i}>": i for i in SPECIAL}

    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)

    def to_str(self) -> str:
        return "{}"


def _cfg(encoder: str, k: int | str = 3, **kw) -> RouterConfig:
    return RouterConfig(
        encoder=encoder,
        learned=LearnedEncoderConfig(vocab_size=V, d_model=32, span_min=10, span_max=60, batch_size=32, steps=60, temperature=0.1),
        tfidf=TfidfEncoderConfig(dim=16),
        clustering=ClusteringConfig(n_categories=k, n_init=2),
        classifier=ClassifierConfig(hidden=32, epochs=20, replay_per_category=100),
        **kw,
    )


@pytest.fixture(scope="module")
def learned_router():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train, _ = corpus([0, 1, 2], 60, noise=0.25)
    val, _ = corpus([0, 1, 2], 15, seed=1, noise=0.25)
    r = fit_router(train, val, _cfg("learned"), trainer=loop_trainer(1e-2), vocab_size=V)
    test, labels = corpus([0, 1, 2], 30, seed=2, noise=0.25)
    torch.set_num_threads(n)
    return r, test, labels


def test_learned_router_finds_the_topics(learned_router) -> None:
    r, test, labels = learned_router
    decisions = r.route(test)
    assert isinstance(decisions, list) and all(isinstance(d, RoutingDecision) for d in decisions)
    assert normalized_mutual_info_score(labels, [d.top for d in decisions]) > 0.9
    rep = r.report
    assert rep["n_categories"] == 3 and sum(rep["cluster_sizes"]) == 180
    assert 0 <= rep["classifier"]["val_ece"] <= 0.2 and rep["classifier"]["temperature"] > 0
    assert r.embedding is not None and r.embedding.weight.shape == (V, 32)


def test_batch_routing_equals_single_routing(learned_router) -> None:
    r, test, _ = learned_router
    seqs = test[:20] + [[], [3, 4]]
    batch = r.route(seqs)
    singles = [r.route(s) for s in seqs]
    for b, s in zip(batch, singles):
        assert (b.selected, b.fallback, b.crosstalk, b.reason) == (s.selected, s.fallback, s.crosstalk, s.reason)
        # batched matrix products round differently from one row at a time: equal to float32 precision
        np.testing.assert_allclose(b.confidences, s.confidences, atol=1e-6)
        assert b.c_S == pytest.approx(s.c_S, abs=1e-12)
    assert r.route(torch.tensor(test[0])).selected == singles[0].selected
    assert r.route(np.array(test[0])).selected == singles[0].selected


def test_bad_input_never_crashes(learned_router) -> None:
    r, _, _ = learned_router
    empty = r.route([])
    assert empty.fallback and empty.reason == "empty input" and empty.selected == [0, 1, 2]
    unknown = r.route([3, 4, 5] + UNSEEN)  # special ids and ids never seen in training
    assert unknown.fallback and unknown.reason == "no known tokens"
    assert np.allclose(unknown.confidences, 1 / 3)
    with pytest.raises(DataError, match="out of range"):
        r.route([12, V + 5])
    with pytest.raises(DataError, match="text"):
        r.route(["hello", "world"])
    with pytest.raises(ConfigError, match="tokenizer"):
        r.route_text("hello")


def test_untrained_router_raises_a_clear_error(learned_router) -> None:
    r, test, _ = learned_router
    fresh = LearnedEncoder(LearnedEncoderConfig(vocab_size=V, d_model=32))
    untrained = Router(fresh, r.head, r.centroids, r.complexity, r.policy, r.categories)
    with pytest.raises(NotFittedError, match="not fitted"):
        untrained.route(test[0])
    with pytest.raises(CheckpointError, match="not found"):
        Router.load("/nonexistent/router")


def test_save_load_round_trip(learned_router, tmp_path: Path) -> None:
    r, test, _ = learned_router
    folder = r.save(tmp_path / "router")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["centroids.safetensors", "complexity.json", "complexity.safetensors", "config.json", "model.safetensors"]
    back = Router.load(folder)
    assert [d.to_dict() for d in back.route(test)] == [d.to_dict() for d in r.route(test)]
    cj = json.loads((folder / "complexity.json").read_text())
    assert len(cj["coef"]) == len(cj["features"]) == 10
    emb = load_shared_embedding(folder)
    torch.testing.assert_close(emb.weight, r.embedding.weight)
    # a corrupt weights file names itself
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Router.load(folder)


def test_tfidf_router_and_no_shared_table(tmp_path: Path) -> None:
    train, _ = corpus([0, 1, 2, 3], 40)
    val, _ = corpus([0, 1, 2, 3], 10, seed=1)
    test, labels = corpus([0, 1, 2, 3], 20, seed=2)
    r = fit_router(train, val, _cfg("tfidf", k=4), tokenizer=FakeTokenizer())
    assert normalized_mutual_info_score(labels, [d.top for d in r.route(test)]) > 0.9
    assert r.embedding is None and all(r.descriptions)
    folder = r.save(tmp_path / "r")
    with pytest.raises(CheckpointError, match="no shared"):
        load_shared_embedding(folder)


def test_auto_n_categories_reports_silhouette() -> None:
    train, _ = corpus([0, 1, 2], 40, noise=0.05)
    val, _ = corpus([0, 1, 2], 10, seed=1, noise=0.05)
    r = fit_router(train, val, _cfg("tfidf", k="auto"))
    assert r.n_categories == 3
    assert [row["n_categories"] for row in r.report["silhouette"]] == list(range(2, 9))


def test_add_category_keeps_old_decisions(learned_router, tmp_path: Path) -> None:
    """Fit on topics 0-2, add topic 3 from its documents: old decisions kept, new ones routed to it."""
    r0, test, _ = learned_router
    r = Router.load(r0.save(tmp_path / "r"))  # a copy to modify
    before = r.route(test)
    new_docs, _ = corpus([3], 60, seed=5, noise=0.25)
    m = r.add_category("topic3", new_docs, description="the fourth topic")
    assert r.categories == ["c0", "c1", "c2", "topic3"] and r.centroids.shape == (4, 32)
    after = r.route(test)
    same = np.mean([a.selected == b.selected for a, b in zip(after, before)])
    assert same >= 0.95, m
    held_out, _ = corpus([3], 30, seed=6, noise=0.25)
    assert np.mean([d.top == 3 for d in r.route(held_out)]) >= 0.9
    with pytest.raises(ConfigError, match="new"):
        r.add_category("topic3", new_docs)
    with pytest.raises(DataError, match="none of"):
        r.add_category("ghost", [[3, 4], []])


def test_complexity_labels_from_the_user() -> None:
    train, _ = corpus([0, 1], 40, lengths=(10, 200))
    labels = [int(len(s) > 100) for s in train]
    r = fit_router(train, [], _cfg("tfidf", k=2), complexity_labels=labels)
    assert r.report["complexity"]["target"] == "user labels"
    with pytest.raises(DataError, match="complexity_labels"):
        fit_router(train, [], _cfg("tfidf", k=2), complexity_labels=labels[:3])


def test_router_embedding_is_the_shared_table_of_an_expert(learned_router) -> None:
    """``router.embedding`` goes into the nn builders as ``embedding=``: the same Parameter, not a copy."""
    from taskmoe.models import LMConfig, expert_lm

    r, test, _ = learned_router
    lm = expert_lm(LMConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2), embedding=r.embedding)
    assert lm.embedding.weight is r.embedding.weight
    out = lm(torch.tensor([test[0][:16]]))
    assert out.logits.shape == (1, 16, V)
