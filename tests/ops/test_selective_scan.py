"""The chunked two-level selective scan and its one-step form equal the plain recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _twins import assert_twins
from taskmoe.ops import selective_scan, selective_scan_ref, selective_scan_step


def _inputs(B, T, E, N, *, skip, gate, state):
    return dict(
        x=torch.randn(B, T, E),
        dt=F.softplus(torch.randn(B, T, E) - 1.0),
        A=-torch.rand(E, N) * 4 - 0.1,
        Bm=torch.randn(B, T, N),
        Cm=torch.randn(B, T, N),
        D=torch.randn(E) if skip else None,
        z=torch.randn(B, T, E) if gate else None,
        state=torch.randn(B, E, N) if state else None,
    )


@pytest.mark.parametrize("B,T,E,N,L", [(2, 37, 6, 4, 8), (1, 64, 4, 8, 16), (2, 5, 3, 2, None), (3, 50, 5, 3, 7)])
@pytest.mark.parametrize("extras", [False, True])
def test_chunked_matches_ref(B, T, E, N, L, extras) -> None:
    inputs = _inputs(B, T, E, N, skip=extras, gate=extras, state=extras)
    assert_twins(selective_scan, selective_scan_ref, inputs, {"chunk_size": L})


def test_large_steps_stay_finite() -> None:
    """dt*A of -200 per step: exp(-cumsum) tricks overflow; the chunked scan only takes exp(<= 0)."""
    inp = _inputs(1, 40, 3, 2, skip=False, gate=False, state=True)
    inp["dt"] = torch.full_like(inp["dt"], 50.0)
    inp["A"] = torch.full_like(inp["A"], -4.0)
    y, h = selective_scan(**inp, chunk_size=16)
    y_ref, h_ref = selective_scan_ref(**inp)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


def test_hand_computed_example() -> None:
    """E=N=1, A=-ln2, dt=1 (decay 1/2), B=C=1, x=(2,2,2): h = 2, 3, 3.5; with D=1: y = h + x."""
    x = torch.full((1, 3, 1), 2.0)
    dt = torch.ones(1, 3, 1)
    A = torch.tensor([[-torch.log(torch.tensor(2.0)).item()]])
    ones = torch.ones(1, 3, 1)
    y, h = selective_scan(x, dt, A, ones, ones, torch.ones(1), chunk_size=2)
    assert torch.allclose(y.flatten(), torch.tensor([4.0, 5.0, 5.5]))
    assert torch.allclose(h.flatten(), torch.tensor([3.5]))


def test_chunked_prefill_then_steps_equals_full() -> None:
    inp = _inputs(2, 29, 4, 3, skip=True, gate=True, state=False)
    full, full_h = selective_scan_ref(**inp)
    split = 11
    seq = ("x", "dt", "Bm", "Cm", "z")
    pre = {k: (v[:, :split] if k in seq else v) for k, v in inp.items() if k != "state"}
    y, h = selective_scan(**pre, chunk_size=4)
    ys = [y]
    for t in range(split, 29):
        step = {k: (v[:, t] if k in seq else v) for k, v in inp.items() if k != "state"}
        y_t, h = selective_scan_step(**step, state=h)
        ys.append(y_t.unsqueeze(1))
    torch.testing.assert_close(torch.cat(ys, 1), full)
    torch.testing.assert_close(h, full_h)


def test_custom_backward_passes_gradcheck() -> None:
    """Finite differences in float64 agree with the hand-written adjoint (incl. dA and the initial state)."""
    inp = _inputs(2, 7, 3, 2, skip=False, gate=False, state=True)
    inp = {k: (None if v is None else v.double().requires_grad_(True)) for k, v in inp.items()}
    args = (inp["x"], inp["dt"], inp["A"], inp["Bm"], inp["Cm"], inp["state"])

    def fn(x, dt, A, Bm, Cm, state):
        return selective_scan(x, dt, A, Bm, Cm, state=state, chunk_size=3)

    assert torch.autograd.gradcheck(fn, args)
