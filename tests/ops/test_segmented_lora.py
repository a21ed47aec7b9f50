"""Segmented low-rank matmul: the fast (sorted segments) form equals the per-row loop twin, outputs and
gradients, for unsorted ids, rows without an adapter, adapters a layer lacks, and a time axis."""

from __future__ import annotations

import pytest
import torch

from taskmoe.ops.segmented_lora import plan_segments, segmented_lora, segmented_lora_ref

IN, OUT = 12, 10


def _adapters(ranks, seed=0):
    """Leaf (A, B, scale) per rank (None: the layer lacks that adapter)."""
    g = torch.Generator().manual_seed(seed)
    return [None if r is None else (torch.randn(r, IN, generator=g).requires_grad_(True),
                                    torch.randn(OUT, r, generator=g).requires_grad_(True), 0.5 + r) for r in ranks]


@pytest.mark.parametrize("ids", [[2, 0, -1, 1, 0, 2, -1, 1, 1], [0, 0, 1, 1, 2], [-1, 2], [1]])
@pytest.mark.parametrize("time", [None, 3])
def test_fast_equals_per_row_loop_with_grads(ids, time) -> None:
    ranks = [4, 2, None]  # adapter 2 is absent on this layer: its rows get exactly zero
    fast_w, ref_w = _adapters(ranks), _adapters(ranks)
    ids_t = torch.tensor(ids)
    x = torch.randn(len(ids), IN) if time is None else torch.randn(len(ids), time, IN)
    xf, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fast = segmented_lora(xf, fast_w, plan_segments(ids_t, 3), OUT)
    ref = segmented_lora_ref(xr, ref_w, ids_t, OUT)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    zero_rows = (ids_t == -1) | (ids_t == 2)
    assert bool((fast[zero_rows] == 0).all())
    if bool(zero_rows.all()):
        return  # nothing depends on the inputs
    probe = torch.randn_like(ref)
    (fast * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for wf, wr in zip(fast_w, ref_w):
        if wf is not None:
            for pf, pr in zip(wf[:2], wr[:2]):
                assert (pf.grad is None) == (pr.grad is None)
                if pr.grad is not None:
                    torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-5, atol=1e-5)


def test_plan_sorts_once_and_skips_sorted_rows() -> None:
    p = plan_segments(torch.tensor([1, -1, 0, 1, 0]), 2)
    assert p.offsets == (1, 3, 5) and p.order.tolist() == [1, 2, 4, 0, 3]
    assert plan_segments(torch.tensor([-1, 0, 0, 1]), 2).order is None
    with pytest.raises(ValueError, match=r"adapter ids must be in \[-1, 2\)"):
        plan_segments(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="plan is for 5 rows"):
        segmented_lora(torch.randn(4, IN), _adapters([2, 2]), p, OUT)


@pytest.mark.parametrize("ids", [[2, 0, -1, 1, 0, 2, -1, 1, 1], [-1, -1], [1], [0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1]])
@pytest.mark.parametrize("absent", [False, True])
def test_batched_form_equals_per_row_loop(ids, absent) -> None:
    from taskmoe.ops.segmented_lora import batched_lora, plan_batches, stack_adapters

    ad = list(_adapters([4, 2, 3]))
    if absent:
        ad[1] = None  # a layer without adapter 1: its rows get exact zeros
    ids_t = torch.tensor(ids)
    x = torch.randn(len(ids), 3, IN)
    with torch.no_grad():
        a_stack, b_stack = stack_adapters(ad, IN, OUT, x)
        fast = batched_lora(x, a_stack, b_stack, plan_batches(ids_t, 3))
        ref = segmented_lora_ref(x, ad, ids_t, OUT)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert bool((fast[ids_t == -1] == 0).all())
    if absent:
        assert bool((fast[ids_t == 1] == 0).all())


def test_batched_plan_needs_no_gather_for_sorted_equal_segments() -> None:
    from taskmoe.ops.segmented_lora import plan_batches

    assert plan_batches(torch.tensor([0, 0, 1, 1, 2, 2]), 3).gather is None
    assert plan_batches(torch.tensor([0, 1, 1, 2, 2, 2]), 3).gather is not None  # unequal: padded
    assert plan_batches(torch.tensor([1, 1, 0, 0]), 2).gather is not None  # unsorted
    with pytest.raises(ValueError, match="adapter ids"):
        plan_batches(torch.tensor([0, 3]), 3)
