"""RoutedMixture (grouped dispatch equals running every expert; pruning and fallback rules), routing
weights, retrieval windows and the experts recipe's loss function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskmoe.errors import ConfigError
from taskmoe.experts.ensemble import RoutedMixture, mixture_logprobs, routing_weights
from taskmoe.experts.semantic_loss import RetrievalIndex, RetrievalWindows, expected_embedding, semantic_similarity_loss
from taskmoe.router.policy import RoutingDecision
from taskmoe.training.losses import lm_cross_entropy
from taskmoe.training.recipes.experts import expert_loss

V = 11


class Counting(nn.Module):
    """A tiny LM (embedding -> linear head) that records the batch sizes it was called with."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(V, 8, generator=g))
        self.head = nn.Parameter(torch.randn(8, V, generator=g))
        self.calls: list[int] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids.shape[0])
        return self.emb[ids] @ self.head  # (B, T, V)


def _mixture() -> RoutedMixture:
    return RoutedMixture({"a": Counting(0), "b": Counting(1), "c": Counting(2)})


def test_grouped_mixture_equals_every_expert_on_every_row() -> None:
    mix = _mixture()
    ids = torch.randint(0, V, (4, 6))
    W = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0]])
    out = mix(ids, W)
    # each expert ran once, on its own rows only: a on rows 0,2; b on 0,2,3; c on 1,2
    assert [mix.experts[n].calls for n in "abc"] == [[2], [3], [2]]
    ref_logits = torch.stack([mix.experts[n](ids) for n in "abc"])  # (E, B, T, V)
    ref = mixture_logprobs(ref_logits, W.T)  # weights (E, B)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.exp().sum(-1), torch.ones(4, 6), atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in mix.parameters())


def test_unused_expert_gets_no_gradient_and_pruning_falls_back() -> None:
    mix = _mixture()
    ids = torch.randint(0, V, (3, 5))
    W = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    conf = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    mix.prune(["c"])
    assert mix.active == ["a", "b"]
    # row 1 gave all its weight to the pruned expert: its confidences over a, b -> (0.5, 0.5)
    eff = mix.effective_weights(W, conf)
    torch.testing.assert_close(eff, torch.tensor([[0.7, 0.3, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]))
    # without confidences the fallback is uniform over the active experts
    torch.testing.assert_close(mix.effective_weights(W)[1], torch.tensor([0.5, 0.5, 0.0]))
    mix(ids, W, conf).sum().backward()
    assert mix.experts["c"].calls == [] and all(p.grad is None for p in mix.experts["c"].parameters())
    assert mix.contributions(W, conf)[1] == {"a": 0.5, "b": 0.5}
    with pytest.raises(ConfigError, match="unknown expert"):
        mix.prune(["zzz"])
    with pytest.raises(ConfigError, match="every expert is pruned"):
        mix.prune(["a", "b"])


def test_routing_weights_rules() -> None:
    cats = ["x", "y", "z"]
    normal = RoutingDecision([0.6, 0.3, 0.1], 0.2, 0.25, [0, 1], [2 / 3, 1 / 3], False, None, cats)
    fb = RoutingDecision([0.4, 0.35, 0.25], 0.0, 0.5, [0, 1, 2], [0.4, 0.35, 0.25], True, None, cats)
    torch.testing.assert_close(routing_weights([normal, fb], 3, "routed"),
                               torch.tensor([[2 / 3, 1 / 3, 0.0], [0.4, 0.35, 0.25]]))
    torch.testing.assert_close(routing_weights([normal, fb], 3, "top1"), torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    torch.testing.assert_close(routing_weights([normal], 3, "all"), torch.tensor([[0.6, 0.3, 0.1]]))
    with pytest.raises(ConfigError, match="routing mode"):
        routing_weights([normal], 3, "best")


def test_retrieval_windows_neighbours_and_collate() -> None:
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, V, (7,), generator=g) for _ in range(30)]
    vecs = torch.randn(30, 5, generator=g)
    index = RetrievalIndex(vecs, backend="exact")
    ds = RetrievalWindows(windows, vecs, index, 3, exclude_self=True)
    vn = F.normalize(vecs, dim=-1)
    sims = vn @ vn.T
    sims.fill_diagonal_(-2)
    assert torch.equal(ds.neighbour_ids, sims.topk(3, dim=-1).indices)
    b = ds.collate([ds[4], ds[9]])
    assert torch.equal(b["input_ids"], torch.stack([windows[4][:-1], windows[9][:-1]]))
    assert torch.equal(b["targets"], torch.stack([windows[4][1:], windows[9][1:]]))
    assert torch.equal(b["neighbours"], index.vectors[ds.neighbour_ids[[4, 9]]])  # (2, 3, 5)
    held = RetrievalWindows(windows[:2], vecs[:2], index, 3, exclude_self=False)
    assert held.neighbour_ids[0, 0] == 0  # a held-out query may retrieve its identical twin


def test_expert_loss_mixes_ce_and_semantic_term() -> None:
    torch.manual_seed(0)
    table = torch.randn(V, 5)
    tw = torch.rand(V)
    model = Counting(3)
    batch = {"input_ids": torch.randint(0, V, (2, 6)), "targets": torch.randint(0, V, (2, 6)),
             "neighbours": torch.randn(2, 3, 5)}
    logits = model(batch["input_ids"])
    ce = lm_cross_entropy(logits, batch["targets"])
    sem = semantic_similarity_loss(expected_embedding(logits, table, token_weights=tw), batch["neighbours"])
    loss0, m0 = expert_loss(0.0, table, tw)(model, batch)
    assert loss0.item() == pytest.approx(ce.item()) and "sem_sim" not in m0  # λ=0 skips the term in training
    model.eval()
    _, m0e = expert_loss(0.0, table, tw)(model, batch)
    assert float(m0e["sem_sim"]) == pytest.approx(1 - sem.item(), abs=1e-6)  # but reports it at evaluation
    model.train()
    loss1, _ = expert_loss(1.0, table, tw)(model, batch)
    assert loss1.item() == pytest.approx(sem.item(), abs=1e-6)
    loss_mix, m = expert_loss(0.1, table, tw)(model, batch)
    assert loss_mix.item() == pytest.approx(0.9 * ce.item() + 0.1 * sem.item(), abs=1e-6)
    assert m["tokens"] == 12
    loss1.backward()
    assert model.head.grad is not None and model.head.grad.abs().sum() > 0
