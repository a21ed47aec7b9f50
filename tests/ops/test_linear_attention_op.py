"""Chunked linear attention and its one-step form equal the plain recurrence (outputs, states, grads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _twins import assert_twins
from taskmoe.ops import linear_attention, linear_attention_ref, linear_attention_step


def _inputs(B, T, H, Dk, Dv, *, decay, state):
    return dict(
        q=torch.randn(B, T, H, Dk) * 0.5,
        k=torch.randn(B, T, H, Dk) * 0.5,
        v=torch.randn(B, T, H, Dv),
        g=F.logsigmoid(torch.randn(B, T, H) + 2.0) if decay else None,
        state=torch.randn(B, H, Dk, Dv) if state else None,
    )


@pytest.mark.parametrize("B,T,H,Dk,Dv,L", [(2, 37, 3, 8, 8, 8), (1, 64, 2, 4, 6, 16), (2, 5, 1, 8, 9, 64), (3, 50, 2, 16, 16, 7)])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("state", [False, True])
def test_chunked_matches_ref(B, T, H, Dk, Dv, L, decay, state) -> None:
    inputs = _inputs(B, T, H, Dk, Dv, decay=decay, state=state)
    assert_twins(linear_attention, linear_attention_ref, inputs, {"chunk_size": L})


def test_strong_decay_is_finite() -> None:
    """Log decays of -30 per step would overflow an exp(-cumsum) formulation; masked differences do not."""
    inp = _inputs(1, 40, 2, 4, 4, decay=True, state=True)
    inp["g"] = torch.full_like(inp["g"], -30.0)
    o, S = linear_attention(**inp, chunk_size=16)
    o_ref, S_ref = linear_attention_ref(**inp)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)


def test_hand_computed_example() -> None:
    """H=1, Dk=Dv=1, q=k=1, v=(1,2,3), gamma=1/2: S = 1, 2.5, 4.25 and o = S."""
    q = k = torch.ones(1, 3, 1, 1)
    v = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    g = torch.full((1, 3, 1), 0.5).log()
    o, S = linear_attention(q, k, v, g, chunk_size=2)
    assert torch.allclose(o.flatten(), torch.tensor([1.0, 2.5, 4.25]))
    assert torch.allclose(S.flatten(), torch.tensor([4.25]))


@pytest.mark.parametrize("decay", [False, True])
def test_chunked_prefill_then_steps_equals_full(decay) -> None:
    inp = _inputs(2, 30, 2, 8, 8, decay=decay, state=False)
    full, full_S = linear_attention_ref(**inp)
    split = 13
    pre = {k: (None if v is None else v[:, :split]) for k, v in inp.items() if k != "state"}
    o, S = linear_attention(**pre, chunk_size=4)
    outs = [o]
    for t in range(split, 30):
        g_t = None if inp["g"] is None else inp["g"][:, t]
        o_t, S = linear_attention_step(inp["q"][:, t], inp["k"][:, t], inp["v"][:, t], g_t, state=S)
        outs.append(o_t.unsqueeze(1))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(S, full_S, rtol=1e-5, atol=2e-5)
