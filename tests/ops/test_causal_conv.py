"""causal_conv (conv1d form) and causal_conv_step (rolling buffer) equal the plain-loop twin."""

from __future__ import annotations

import pytest
import torch

from _twins import assert_twins
from taskmoe.ops import causal_conv, causal_conv_ref, causal_conv_step


def _inputs(B, T, C, K, d, *, gate, state, bias=True):
    W = (K - 1) * d
    return dict(
        x=torch.randn(B, T, C),
        weight=torch.randn(C, K),
        bias=torch.randn(C) if bias else None,
        gate=torch.randn(B, T, C) if gate else None,
        state=torch.randn(B, C, W) if state else None,
    )


@pytest.mark.parametrize("B,T,C,K,d", [(2, 17, 5, 3, 1), (1, 9, 4, 2, 4), (3, 33, 6, 4, 2), (2, 5, 3, 1, 1)])
@pytest.mark.parametrize("gate,state", [(False, False), (True, True)])
def test_conv_matches_ref(B, T, C, K, d, gate, state) -> None:
    inputs = _inputs(B, T, C, K, d, gate=gate, state=state)
    assert_twins(causal_conv, causal_conv_ref, inputs, {"dilation": d}, {"dilation": d})


def test_hand_computed_example() -> None:
    """x = 1,2,3,4 (one channel), taps w = [10, 1] with dilation 2: y_t = x_t + 10 x_{t-2}."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    y, state = causal_conv(x, torch.tensor([[10.0, 1.0]]), dilation=2)
    assert y.flatten().tolist() == [1.0, 2.0, 13.0, 24.0]
    assert state.flatten().tolist() == [3.0, 4.0]  # the last (K-1)*d = 2 inputs


@pytest.mark.parametrize("K,d", [(3, 1), (3, 4), (4, 2)])
def test_prefill_then_steps_equals_full(K, d) -> None:
    B, T, C, split = 2, 23, 5, 9
    inp = _inputs(B, T, C, K, d, gate=True, state=False)
    full, full_state = causal_conv_ref(inp["x"], inp["weight"], inp["bias"], dilation=d, gate=inp["gate"])
    y, s = causal_conv(inp["x"][:, :split], inp["weight"], inp["bias"], dilation=d, gate=inp["gate"][:, :split])
    ys = [y]
    for t in range(split, T):
        yt, s = causal_conv_step(inp["x"][:, t], inp["weight"], inp["bias"], dilation=d, gate=inp["gate"][:, t], state=s)
        ys.append(yt.unsqueeze(1))
    torch.testing.assert_close(torch.cat(ys, 1), full)
    torch.testing.assert_close(s, full_state)


def test_bad_state_shape_is_named() -> None:
    with pytest.raises(ValueError, match="state has shape"):
        causal_conv(torch.randn(1, 4, 3), torch.randn(3, 3), state=torch.zeros(1, 3, 5))
