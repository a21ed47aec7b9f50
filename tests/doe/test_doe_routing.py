"""The routing rule: pooling over the prompt, capacity assignment, threshold + default, weights, gate loss."""

from __future__ import annotations

import math

import pytest
import torch

from taskmoe.doe.routing import Routing, balanced_assignment, capacity_for, decide, gate_loss, pool_prompt
from taskmoe.doe.seq_moe import SequenceGate


def test_pool_prompt_hand_values() -> None:
    # row 0: prompt = first two positions -> mean of [1, 3] = 2 ; row 1: only position 2 -> 5
    h = torch.tensor([[[1.0], [3.0], [100.0]], [[7.0], [9.0], [5.0]]])  # (B=2, T=3, D=1)
    mask = torch.tensor([[True, True, False], [False, False, True]])
    assert pool_prompt(h, mask).flatten().tolist() == [2.0, 5.0]
    assert pool_prompt(h).flatten().tolist() == pytest.approx([104 / 3, 7.0])


def test_capacity_for() -> None:
    assert capacity_for(16, 8, 1.0) == 2  # ceil(16/8)
    assert capacity_for(10, 4, 1.0) == 3  # ceil(2.5)
    assert capacity_for(16, 8, 1.5) == 3
    assert capacity_for(2, 8, 1.0) == 1  # at least one


def test_balanced_assignment_hand_example() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.7, 0.2], [0.3, 0.95]])
    # round 1: rows 0, 1, 2 propose to e0, row 3 to e1; e0 (room 2) keeps rows 0, 1 (best scores)
    # round 2: row 2 proposes to e1 (e0 is full) and is taken
    got = balanced_assignment(scores, capacity=2, k=1)
    assert got.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    # k = 2 with enough room: every row gets both experts
    assert bool(balanced_assignment(scores, capacity=4, k=2).all())


def test_balanced_assignment_respects_capacity_and_serves_every_row() -> None:
    torch.manual_seed(0)
    for B, E, k in ((16, 4, 1), (12, 3, 2), (10, 8, 1)):
        s = torch.rand(B, E)
        s[:, 0] += 1.0  # every row prefers expert 0: plain expert choice would overload it
        C = capacity_for(B, E, 1.0, k)
        a = balanced_assignment(s, C, k)
        assert (a.sum(0) <= C).all() and (a.sum(1) <= k).all() and (a.sum(1) >= 1).all()
        if k == 1:
            assert (a.sum(1) == 1).all()


def test_decide_threshold_topk_weights_and_default() -> None:
    p = torch.tensor([
        [0.9, 0.6, 0.7],  # three accepted, K=2 keeps experts 0 and 2: w = 0.9/1.6, 0.7/1.6
        [0.1, 0.8, 0.2],  # one accepted -> weight exactly 1
        [0.3, 0.45, 0.2],  # none accepted -> default = best eligible (expert 1), weight 1
    ])
    ids, w, fb = decide(p, p > 0.5, 2, torch.tensor([True, True, True]))
    assert ids.tolist() == [[0, 2], [1, -1], [1, -1]]
    assert w[0].tolist() == pytest.approx([0.9 / 1.6, 0.7 / 1.6])
    assert w[1].tolist() == [1.0, 0.0] and w[2].tolist() == [1.0, 0.0]
    assert fb.tolist() == [False, False, True]
    # expert 1 not eligible as a default (added late): the unaccepted row goes to expert 0
    ids, w, fb = decide(p, p > 0.5, 2, torch.tensor([True, False, True]))
    assert ids[2].tolist() == [0, -1]


def test_single_expert_weight_is_one_with_gradient_to_its_gate() -> None:
    """w = p / stop_grad(p) is exactly 1 in value, and dw/dp = 1/p (the LM loss reaches the gate)."""
    p = torch.tensor([[0.25, 0.9]], requires_grad=True)
    ids, w, _ = decide(p, torch.tensor([[False, True]]), 1, torch.tensor([True, True]))
    assert ids.tolist() == [[1]] and w.item() == 1.0
    w.sum().backward()
    assert p.grad[0].tolist() == pytest.approx([0.0, 1 / 0.9])


def test_gate_loss_hand_values() -> None:
    p = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    r = Routing(("a", "b"), torch.tensor([[0], [1]]), torch.ones(2, 1), p, torch.tensor([[True, False], [False, True]]),
                torch.zeros(2, dtype=torch.bool))
    # capacity targets: BCE = mean(-log .8, -log .8, -log .6, -log .6)
    assert gate_loss(r).item() == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, rel=1e-6)
    # router labels: row 0 -> expert 1 (target [0, 1]), row 1 unlabelled (ignored):
    # mean(-log(1 - .8), -log .2) = -log .2
    assert gate_loss(r, torch.tensor([1, -1])).item() == pytest.approx(-math.log(0.2), rel=1e-6)
    with pytest.raises(ValueError):
        gate_loss(r, torch.tensor([2, 0]))


def test_gate_capacity_in_training_threshold_in_eval() -> None:
    torch.manual_seed(0)
    g = SequenceGate(16, ["a", "b", "c", "d"], tau=0.5, max_experts=1, capacity_factor=1.0)
    h = torch.randn(12, 16)
    g.train()
    r = g(h)
    assert r.accepted.sum(0).tolist() == [3, 3, 3, 3]  # C = ceil(12 / 4), all used
    assert (r.accepted.sum(1) == 1).all() and not bool(r.fallback.any())
    g.eval()
    r = g(h)
    assert torch.equal(r.accepted, r.scores > 0.5)


def test_unaccepted_sequences_go_to_best_eligible_expert() -> None:
    torch.manual_seed(0)
    g = SequenceGate(8, ["a", "b", "c"], tau=0.5).eval()
    with torch.no_grad():
        for n in g.names:
            g.bias[n].fill_(-20.0)  # nobody accepts anything
    h = torch.randn(6, 8)
    r = g(h)
    assert bool(r.fallback.all())
    assert torch.equal(r.ids[:, 0], r.scores.argmax(1))
    assert bool((r.weights[:, 0] == 1).all())
    # a late expert never becomes the default, even when it scores best
    g.add_expert("late", bias=-10.0)
    r2 = g(h)
    assert "late" not in {n for row in r2.expert_names() for n in row}
    assert torch.equal(r2.ids[:, 0], r.ids[:, 0])


def test_routing_select_and_cat_round_trip() -> None:
    torch.manual_seed(0)
    g = SequenceGate(8, ["a", "b", "c"], max_experts=2).eval()
    r = g(torch.randn(5, 8))
    parts = [r.select(torch.tensor([0, 1])), r.select(torch.tensor([2, 3, 4]))]
    back = Routing.cat(parts)
    for f in ("ids", "weights", "scores", "accepted", "fallback"):
        assert torch.equal(getattr(back, f), getattr(r, f)), f
