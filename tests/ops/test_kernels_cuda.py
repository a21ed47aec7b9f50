"""The real GPU kernels against the ``_ref`` twins, on CUDA (outputs and final states, with and without a
carried-in state). Skipped with a reason where there is no CUDA device or the library does not import."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taskmoe.ops import kernels, linear_attention, linear_attention_ref, selective_scan, selective_scan_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the fused kernels run only on CUDA")
TOL = dict(rtol=2e-3, atol=2e-3)  # the kernels accumulate in a different order (and tf32 where enabled)


def _need(name: str) -> None:
    kernels.reset_cache()
    if not kernels.available(name):
        pytest.skip(f"{kernels.PINS[name]} is not importable here (pip install 'taskmoe[gpu]')")


@pytest.mark.parametrize("with_state", [False, True], ids=["from-zero", "prefill-with-state"])
def test_fla_simple_gla_matches_the_reference(with_state) -> None:
    _need("simple_gla")
    g = torch.Generator(device="cuda").manual_seed(0)
    Bsz, T, H, K, V = 2, 100, 4, 32, 32
    q, k = (torch.randn(Bsz, T, H, K, device="cuda", generator=g) * K**-0.5 for _ in range(2))
    v = torch.randn(Bsz, T, H, V, device="cuda", generator=g)
    gate = F.logsigmoid(torch.randn(Bsz, T, H, device="cuda", generator=g) + 3)
    S = torch.randn(Bsz, H, K, V, device="cuda", generator=g) if with_state else None
    assert kernels.kernel("simple_gla", q, k, v, gate, S) is not None
    o, S_out = linear_attention(q, k, v, gate, state=S)
    o_ref, S_ref = linear_attention_ref(q, k, v, gate, state=S)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(S_out, S_ref, **TOL)


@pytest.mark.parametrize("with_state", [False, True], ids=["from-zero", "prefill-with-state"])
def test_mamba_selective_scan_matches_the_reference(with_state) -> None:
    _need("selective_scan")
    g = torch.Generator(device="cuda").manual_seed(0)
    Bsz, T, E, N = 2, 100, 64, 16
    x = torch.randn(Bsz, T, E, device="cuda", generator=g)
    dt = F.softplus(torch.randn(Bsz, T, E, device="cuda", generator=g) - 2)
    A = -torch.rand(E, N, device="cuda", generator=g) - 0.1
    Bm, Cm = (torch.randn(Bsz, T, N, device="cuda", generator=g) for _ in range(2))
    D, z = torch.randn(E, device="cuda", generator=g), torch.randn(Bsz, T, E, device="cuda", generator=g)
    h0 = torch.randn(Bsz, E, N, device="cuda", generator=g) if with_state else None
    assert kernels.kernel("selective_scan", x, dt, A, Bm, Cm) is not None
    y, h = selective_scan(x, dt, A, Bm, Cm, D, z, state=h0)
    y_ref, h_ref = selective_scan_ref(x, dt, A, Bm, Cm, D, z, state=h0)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
