"""SequenceMoE dispatch: mixed batches are exact, vectorized == naive loop, grouped path == general path."""

from __future__ import annotations

import dataclasses

import torch

from taskmoe.doe.routing import Routing
from taskmoe.doe.seq_moe import SequenceGate, SequenceMoE, StackedSwiGLU, dispatch, dispatch_ref
from taskmoe.layers import SwiGLU

D, H = 16, 32
NAMES = ["a", "b", "c", "d"]


def layer(seed: int = 0) -> SequenceMoE:
    torch.manual_seed(seed)
    experts = {n: SwiGLU(D, H) for n in NAMES}
    for m in experts.values():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return SequenceMoE(experts, gate=SequenceGate(D, NAMES, tau=0.5, max_experts=2)).eval()


def routing(ids: list[list[int]], weights: list[list[float]]) -> Routing:
    ids_t = torch.tensor(ids)
    B = len(ids)
    acc = torch.zeros(B, len(NAMES), dtype=torch.bool)
    acc.scatter_(1, ids_t.clamp_min(0), ids_t >= 0)
    return Routing(tuple(NAMES), ids_t, torch.tensor(weights), torch.rand(B, len(NAMES)), acc,
                   torch.zeros(B, dtype=torch.bool))


MIXED = routing([[2, 0], [1, -1], [3, 1], [0, -1], [2, -1], [1, 2]],
                [[0.6, 0.4], [1.0, 0.0], [0.3, 0.7], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])


def test_mixed_batch_equals_each_sequence_alone() -> None:
    moe = layer()
    x = torch.randn(6, 5, D)
    with torch.no_grad():
        y, r = moe(x, MIXED)
        assert r is MIXED  # the layer never re-routes a given routing
        for b in range(6):
            alone, _ = moe(x[b : b + 1], MIXED.select(torch.tensor([b])))
            torch.testing.assert_close(alone, y[b : b + 1], rtol=1e-6, atol=1e-6)
    # the row's output is its experts' weighted sum, by hand for row 0 (experts c and a)
    want = 0.6 * moe.experts["c"](x[0]) + 0.4 * moe.experts["a"](x[0])
    torch.testing.assert_close(y[0], want, rtol=1e-5, atol=1e-6)


def test_vectorized_dispatch_equals_naive_loop_values_and_gradients() -> None:
    moe = layer()
    x = torch.randn(6, 4, D, requires_grad=True)
    w = MIXED.weights.clone().requires_grad_(True)
    r1 = dataclasses.replace(MIXED, weights=w, _plan=None)
    experts = moe.ordered(NAMES)
    y = dispatch(x, r1, experts)
    y_ref = dispatch_ref(x, r1, experts)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, w, *moe.experts.parameters()])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, w, *moe.experts.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_fast_path_equals_general_path() -> None:
    moe = layer()
    x = torch.randn(5, 3, D)
    for r in (routing([[1, 3]] * 5, [[0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
              routing([[2]] * 5, [[1.0]] * 5)):
        assert r.plan.group is not None
        general = dataclasses.replace(r, _plan=dataclasses.replace(r.plan, group=None))
        with torch.no_grad():
            fast = dispatch(x, r, moe.ordered(NAMES))
            slow = dispatch(x, general, moe.ordered(NAMES))
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    # single expert with unit weights: exactly that expert's output, nothing else done
    with torch.no_grad():
        assert torch.equal(dispatch(x, r, moe.ordered(NAMES)), moe.experts["c"](x))


def test_plan_is_computed_once_and_sorted_by_expert() -> None:
    plan = MIXED.plan
    assert MIXED.plan is plan
    assert plan.splits == [2, 3, 3, 1]  # pairs per expert a, b, c, d
    assert plan.rows.tolist() == [0, 3, 1, 2, 5, 0, 4, 5, 2]  # rows of a | b | c | d
    assert plan.group is None and not plan.unit


def test_add_and_remove_expert_leave_other_outputs_bit_identical() -> None:
    moe = layer()
    x = torch.randn(6, 4, D)
    with torch.no_grad():
        before, _ = moe(x, MIXED)
        moe.add_expert("e", SwiGLU(D, H))
        assert moe.names == ("a", "b", "c", "d", "e") and moe.gate.names == moe.names
        after_add, _ = moe(x, MIXED)
        assert torch.equal(before, after_add)
        moe.remove_expert("d")
        # rows not served by d (rows 0, 1, 3, 4, 5) are untouched; the routing must not reference d
        keep = torch.tensor([0, 1, 3, 4, 5])
        sub = MIXED.select(keep)
        sub = Routing(("a", "b", "c"), sub.ids, sub.weights, sub.scores[:, :3], sub.accepted[:, :3], sub.fallback)
        after_rm, _ = moe(x[keep], sub)
        assert torch.equal(after_rm, before[keep])


def test_layer_routes_itself_from_the_prompt_only() -> None:
    moe = layer()
    x = torch.randn(4, 6, D)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :3] = True
    r = moe.route(x, mask)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(4, 3, D)  # change the non-prompt positions only
    r2 = moe.route(x2, mask)
    assert torch.equal(r.ids, r2.ids) and torch.equal(r.weights, r2.weights)


def test_inference_grouped_mm_path_equals_loop_and_never_serves_stale_weights() -> None:
    moe = layer()
    x = torch.randn(6, 3, D)
    experts = moe.ordered(NAMES)
    stack = StackedSwiGLU()
    assert StackedSwiGLU.supports(experts)
    with torch.no_grad():
        fast = dispatch(x, MIXED, experts, stack)
        assert stack.value is not None  # the stacked path really ran
        torch.testing.assert_close(fast, dispatch(x, MIXED, experts), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fast, dispatch_ref(x, MIXED, experts), rtol=1e-6, atol=1e-6)
        moe.experts["b"].down.weight.mul_(2.0)  # an in-place update bumps the version counter
        again = dispatch(x, MIXED, experts, stack)
        torch.testing.assert_close(again, dispatch_ref(x, MIXED, experts), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(again, fast)
