"""Semantic-similarity loss, retrieval index (exact vs faiss) and the confidence-weighted mixture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from taskmoe.errors import ConfigError
from taskmoe.experts.ensemble import mixture_logprobs
from taskmoe.experts.semantic_loss import (
    RetrievalIndex,
    combined_loss,
    expected_embedding,
    semantic_similarity_loss,
)


def test_expected_embedding_hand_computed() -> None:
    # V=2, D=2, E = [[1,0],[0,1]]; logits give p = (0.5, 0.5) at t0 and (1, 0)-ish at t1
    table = torch.eye(2)
    logits = torch.tensor([[[0.0, 0.0], [50.0, 0.0]]])  # (1, 2, 2)
    z = expected_embedding(logits, table)
    # mean_t e_t = ((0.5,0.5) + (1,0)) / 2 = (0.75, 0.25) -> normalized
    want = F.normalize(torch.tensor([[0.75, 0.25]]), dim=-1)
    assert torch.allclose(z, want, atol=1e-6)
    # a mask that keeps only t0 gives (0.5, 0.5) -> (1/sqrt2, 1/sqrt2)
    zm = expected_embedding(logits, table, mask=torch.tensor([[1, 0]]))
    assert torch.allclose(zm, torch.full((1, 2), 1 / math.sqrt(2)), atol=1e-6)
    # token weights scale rows of the table: w = (3, 1) at t0 -> (1.5, 0.5)
    zw = expected_embedding(logits, table, token_weights=torch.tensor([3.0, 1.0]), mask=torch.tensor([[1, 0]]))
    assert torch.allclose(zw, F.normalize(torch.tensor([[1.5, 0.5]]), dim=-1), atol=1e-6)
    with pytest.raises(ConfigError, match="rows"):
        expected_embedding(logits, torch.eye(3))


def test_semantic_loss_values_and_gradient() -> None:
    pred = torch.tensor([[1.0, 0.0]])
    same = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    orth = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    assert semantic_similarity_loss(pred, same).item() == pytest.approx(0.0, abs=1e-7)
    assert semantic_similarity_loss(pred, orth).item() == pytest.approx(1.0)
    assert semantic_similarity_loss(pred, -same).item() == pytest.approx(2.0)
    # gradient reaches the logits and lowering the loss moves the prediction toward the target
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    loss = semantic_similarity_loss(expected_embedding(logits, torch.eye(2)), same)
    loss.backward()
    assert logits.grad is not None and logits.grad[..., 0].sum() < 0 < logits.grad[..., 1].sum()


def test_combined_loss() -> None:
    ce, sem = torch.tensor(4.0), torch.tensor(0.5)
    assert combined_loss(ce, sem, 0.0).item() == 4.0
    assert combined_loss(ce, None, 0.0).item() == 4.0
    assert combined_loss(ce, sem, 1.0).item() == 0.5
    assert combined_loss(ce, sem, 0.1).item() == pytest.approx(0.9 * 4 + 0.1 * 0.5)
    with pytest.raises(ConfigError):
        combined_loss(ce, None, 0.5)
    with pytest.raises(ConfigError):
        combined_loss(ce, sem, 1.5)


def test_exact_index_excludes_self_and_matches_bruteforce() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200, 16, generator=g)
    idx = RetrievalIndex(v, backend="exact")
    q_ids = torch.tensor([3, 50, 199])
    res = idx.search(v[q_ids], 5, exclude=q_ids)
    assert not (res.ids == q_ids[:, None]).any()
    vn = F.normalize(v, dim=-1)
    sims = vn[q_ids] @ vn.T
    sims[torch.arange(3), q_ids] = -2
    assert torch.equal(res.ids, sims.topk(5, dim=-1).indices)
    assert idx.neighbours(v[q_ids], 5, exclude=q_ids).shape == (3, 5, 16)
    with pytest.raises(ConfigError):
        RetrievalIndex(torch.empty(0, 4))


def test_faiss_index_agrees_with_exact() -> None:
    pytest.importorskip("faiss", reason="faiss-cpu not installed (optional: pip install 'taskmoe[ann]')")
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2000, 32, generator=g)
    exact = RetrievalIndex(v, backend="exact")
    ann = RetrievalIndex(v, backend="faiss")
    assert ann.backend == "faiss"
    q = v[:50] + 0.01 * torch.randn(50, 32, generator=g)
    a = exact.search(q, 10).ids
    b = ann.search(q, 10).ids
    recall = sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(50)) / 500
    assert recall > 0.9


def test_mixture_hand_computed_and_degenerate() -> None:
    # two experts over V=2: p1 = (0.9, 0.1), p2 = (0.5, 0.5), w = (0.75, 0.25) -> (0.8, 0.2)
    l1 = torch.log(torch.tensor([0.9, 0.1]))
    l2 = torch.log(torch.tensor([0.5, 0.5]))
    out = mixture_logprobs(torch.stack([l1, l2]), torch.tensor([3.0, 1.0]))
    assert torch.allclose(out.exp(), torch.tensor([0.8, 0.2]), atol=1e-6)
    # one expert with all the weight is that expert
    logits = torch.randn(2, 4, 7, 11)
    out = mixture_logprobs(logits, torch.tensor([1.0, 0.0]))
    assert torch.allclose(out, logits[0].log_softmax(-1), atol=1e-5)
    with pytest.raises(ConfigError):
        mixture_logprobs(logits, torch.tensor([1.0, 1.0, 1.0]))
