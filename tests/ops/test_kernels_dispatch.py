"""GPU-kernel dispatch: used only when importable *and* on CUDA; otherwise the PyTorch path runs.

No GPU is available here, so the CUDA check and the imports are monkeypatched: a fake kernel with
the library's calling convention (layout, keyword names) stands in for fla-core / mamba-ssm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taskmoe.ops import kernels, linear_attention, linear_attention_ref, selective_scan, selective_scan_ref


@pytest.fixture(autouse=True)
def _fresh_cache():
    kernels.reset_cache()
    yield
    kernels.reset_cache()


def _la_inputs():
    q, k = torch.randn(2, 9, 2, 4), torch.randn(2, 9, 2, 4)
    return q, k, torch.randn(2, 9, 2, 5), F.logsigmoid(torch.randn(2, 9, 2)), torch.randn(2, 2, 4, 5)


def _ss_inputs():
    B, T, E, N = 2, 9, 3, 4
    return (torch.randn(B, T, E), F.softplus(torch.randn(B, T, E)), -torch.rand(E, N) - 0.1,
            torch.randn(B, T, N), torch.randn(B, T, N), torch.randn(E), torch.randn(B, T, E))


def test_missing_library_falls_back(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_import", lambda module, attr: None)
    monkeypatch.setattr(kernels, "_on_cuda", lambda tensors: True)  # even "on CUDA"
    assert not kernels.available("simple_gla") and kernels.kernel("selective_scan", torch.zeros(1)) is None
    q, k, v, g, S = _la_inputs()
    torch.testing.assert_close(linear_attention(q, k, v, g, state=S, chunk_size=4)[0], linear_attention_ref(q, k, v, g, state=S)[0])


def test_importable_but_cpu_falls_back(monkeypatch) -> None:
    def boom(*a, **kw):
        raise AssertionError("GPU kernel called for CPU tensors")

    monkeypatch.setattr(kernels, "_import", lambda module, attr: boom)
    assert kernels.available("simple_gla") and kernels.available("selective_scan")
    q, k, v, g, S = _la_inputs()
    o, _ = linear_attention(q, k, v, g, state=S, chunk_size=4)
    torch.testing.assert_close(o, linear_attention_ref(q, k, v, g, state=S)[0])
    x, dt, A, Bm, Cm, D, z = _ss_inputs()
    y, _ = selective_scan(x, dt, A, Bm, Cm, D, z)
    torch.testing.assert_close(y, selective_scan_ref(x, dt, A, Bm, Cm, D, z)[0])


def test_import_error_is_swallowed(monkeypatch) -> None:
    def failing_import(name):
        raise RuntimeError("triton: no CUDA toolchain")

    monkeypatch.setattr(kernels.importlib, "import_module", failing_import)
    assert not kernels.available("simple_gla")


def test_fla_kernel_receives_fla_convention(monkeypatch) -> None:
    calls = []

    def fake_chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
        calls.append(dict(scale=scale, output_final_state=output_final_state, shape=tuple(q.shape)))
        return linear_attention_ref(q * scale, k, v, g, state=initial_state)  # fla layout is (B, T, H, D)

    monkeypatch.setattr(kernels, "_import", lambda module, attr: fake_chunk_simple_gla if attr == "chunk_simple_gla" else None)
    monkeypatch.setattr(kernels, "_on_cuda", lambda tensors: True)
    q, k, v, g, S = _la_inputs()
    o, S_out = linear_attention(q, k, v, g, state=S, chunk_size=4)
    assert calls == [dict(scale=1.0, output_final_state=True, shape=(2, 9, 2, 4))]
    o_ref, S_ref = linear_attention_ref(q, k, v, g, state=S)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S_out, S_ref)


def test_mamba_kernel_receives_channel_major_layout(monkeypatch) -> None:
    calls = []

    def fake_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                               return_last_state=False):
        calls.append(tuple(u.shape))
        t = lambda a: None if a is None else a.transpose(1, 2)  # noqa: E731 - (B, E, T) -> (B, T, E)
        y, h = selective_scan_ref(t(u), t(delta), A, t(B), t(C), D, t(z))
        return (y.transpose(1, 2), h) if return_last_state else y.transpose(1, 2)

    monkeypatch.setattr(kernels, "_import", lambda module, attr: fake_selective_scan_fn if attr == "selective_scan_fn" else None)
    monkeypatch.setattr(kernels, "_on_cuda", lambda tensors: True)
    x, dt, A, Bm, Cm, D, z = _ss_inputs()
    y, h = selective_scan(x, dt, A, Bm, Cm, D, z)
    assert calls == [(2, 3, 9)]
    y_ref, h_ref = selective_scan_ref(x, dt, A, Bm, Cm, D, z)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    # mamba-ssm takes no initial state: carrying one in stays on the PyTorch path
    selective_scan(x, dt, A, Bm, Cm, D, z, state=h)
    assert len(calls) == 1
