"""GPU-kernel dispatch: used only when importable *and* on CUDA; otherwise the PyTorch path runs.

No GPU is available here, so the CUDA check and the imports are monkeypatched. The fakes stand in
for fla-core / mamba-ssm with *their* calling convention, and check it: every axis has its own
size (B=2, T=9, H=3, K=4, V=5 / E=3, N=4), the fake asserts each argument's shape and dtype in the
library's layout and refuses arguments the library refuses (fla >= 0.5 raises on ``head_first``),
and computes with its own loop written in the library's layout, so a transposed call fails.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from taskmoe.ops import kernels, linear_attention, linear_attention_ref, selective_scan, selective_scan_ref

B, T, H, K, V = 2, 9, 3, 4, 5
E, N = 3, 4


@pytest.fixture(autouse=True)
def _fresh_cache():
    kernels.reset_cache()
    yield
    kernels.reset_cache()


def _la_inputs():
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    return q, k, torch.randn(B, T, H, V), F.logsigmoid(torch.randn(B, T, H)), torch.randn(B, H, K, V)


def _ss_inputs():
    return (torch.randn(B, T, E), F.softplus(torch.randn(B, T, E)), -torch.rand(E, N) - 0.1,
            torch.randn(B, T, N), torch.randn(B, T, N), torch.randn(E), torch.randn(B, T, E))


def fake_chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                          state_v_first=False, cu_seqlens=None, **kwargs):
    """fla-core 0.6's ``chunk_simple_gla``: q, k (B, T, H, K), v (B, T, H, V), g (B, T, H), state (B, H, K, V)."""
    if "head_first" in kwargs:
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")
    assert not kwargs, kwargs
    assert q.shape == k.shape == (B, T, H, K) and v.shape == (B, T, H, V), (q.shape, v.shape)
    assert g is None or g.shape == (B, T, H), g.shape
    assert initial_state is None or initial_state.shape == (B, H, K, V), initial_state.shape
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(B, H, K, V) if initial_state is None else initial_state.clone()
    out = []
    for t in range(q.shape[1]):  # the recurrence over fla's time axis (dim 1)
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(out, 1), (S if output_final_state else None)


def fake_selective_scan_fn(u, delta, A, B_, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, cu_seqlens=None):
    """mamba-ssm's ``selective_scan_fn``: u, delta, z (B, E, T), B, C (B, N, T), A (E, N) float32; no initial state."""
    assert u.shape == delta.shape == (B, E, T) and B_.shape == C.shape == (B, N, T), (u.shape, B_.shape)
    assert A.shape == (E, N) and A.dtype == torch.float32, (A.shape, A.dtype)
    assert z is None or z.shape == (B, E, T)
    assert D is None or (D.shape == (E,) and D.dtype == torch.float32)
    h = torch.zeros(B, E, N)
    ys = []
    for t in range(u.shape[2]):  # the recurrence over mamba's time axis (dim 2)
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B_[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, 2)  # (B, E, T)
    y = y if D is None else y + u * D[:, None]
    y = y if z is None else y * F.silu(z)
    return (y, h) if return_last_state else y


def _install(monkeypatch, fakes: dict) -> list:
    calls = []

    def imp(module, attr):
        fn = fakes.get(attr)
        if fn is None:
            return None

        def spy(*a, **kw):
            calls.append(attr)
            return fn(*a, **kw)

        return spy

    monkeypatch.setattr(kernels, "_import", imp)
    monkeypatch.setattr(kernels, "_on_cuda", lambda tensors: True)
    return calls


def test_missing_library_falls_back_and_says_why(monkeypatch, caplog) -> None:
    _install(monkeypatch, {})
    q, k, v, g, S = _la_inputs()
    with caplog.at_level(logging.WARNING, logger="taskmoe.ops.kernels"):
        for _ in range(3):
            o, _ = linear_attention(q, k, v, g, state=S, chunk_size=4)
    torch.testing.assert_close(o, linear_attention_ref(q, k, v, g, state=S)[0])
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "simple_gla" in msgs[0] and "fla-core>=0.5" in msgs[0]  # logged once, with the pin


def test_import_error_reason_is_logged_once(monkeypatch, caplog) -> None:
    def failing_import(name):
        raise RuntimeError("triton: no CUDA toolchain")

    monkeypatch.setattr(kernels.importlib, "import_module", failing_import)
    with caplog.at_level(logging.WARNING, logger="taskmoe.ops.kernels"):
        assert not kernels.available("simple_gla")
        assert not kernels.available("simple_gla")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "RuntimeError: triton: no CUDA toolchain" in msgs[0]


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


def test_unsupported_dtype_stays_on_pytorch(monkeypatch, caplog) -> None:
    calls = _install(monkeypatch, {"chunk_simple_gla": fake_chunk_simple_gla})
    q, k, v, g, S = (t.double() for t in _la_inputs())
    with caplog.at_level(logging.WARNING, logger="taskmoe.ops.kernels"):
        o, _ = linear_attention(q, k, v, g, state=S, chunk_size=4)
    assert calls == [] and "torch.float64" in caplog.text
    torch.testing.assert_close(o, linear_attention_ref(q, k, v, g, state=S)[0])


@pytest.mark.parametrize("with_state", [False, True], ids=["from-zero", "prefill-with-state"])
@pytest.mark.parametrize("with_decay", [True, False], ids=["gated", "no-decay"])
def test_fla_kernel_gets_its_layout(monkeypatch, with_state, with_decay) -> None:
    calls = _install(monkeypatch, {"chunk_simple_gla": fake_chunk_simple_gla})
    q, k, v, g, S = _la_inputs()
    g = g if with_decay else None
    S = S if with_state else None
    o, S_out = linear_attention(q, k, v, g, state=S, chunk_size=4)
    assert calls == ["chunk_simple_gla"]
    o_ref, S_ref = linear_attention_ref(q, k, v, g, state=S)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S_out, S_ref)


def test_fake_fla_rejects_a_head_first_call() -> None:
    """The fake is strict: the layouts a wrong dispatch would produce are refused, not silently computed."""
    q, k, v, g, S = _la_inputs()
    with pytest.raises(DeprecationWarning, match="head_first"):
        fake_chunk_simple_gla(q, k, v, g, head_first=False)
    with pytest.raises(AssertionError):
        fake_chunk_simple_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.transpose(1, 2))


@pytest.mark.parametrize("with_state", [False, True], ids=["from-zero", "prefill-with-state"])
def test_mamba_kernel_gets_its_layout(monkeypatch, with_state) -> None:
    calls = _install(monkeypatch, {"selective_scan_fn": fake_selective_scan_fn})
    x, dt, A, Bm, Cm, D, z = _ss_inputs()
    h0 = torch.randn(B, E, N) if with_state else None
    y, h = selective_scan(x, dt, A, Bm, Cm, D, z, state=h0)
    assert calls == ["selective_scan_fn"]  # a carried-in state uses the kernel too (plus the exact state term)
    y_ref, h_ref = selective_scan_ref(x, dt, A, Bm, Cm, D, z, state=h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


def test_fake_mamba_rejects_a_time_major_call() -> None:
    x, dt, A, Bm, Cm, D, z = _ss_inputs()
    with pytest.raises(AssertionError):
        fake_selective_scan_fn(x, dt, A, Bm, Cm, D, z)  # (B, T, E) instead of (B, E, T)
    with pytest.raises(AssertionError):
        fake_selective_scan_fn(x.transpose(1, 2), dt.transpose(1, 2), A.double(), Bm.transpose(1, 2), Cm.transpose(1, 2))


def test_ssm_layer_keeps_A_in_float32_under_bf16() -> None:
    """As mamba-ssm's block does: A = -exp(A_log.float()); the scan runs in fp32, outputs in the model dtype."""
    from taskmoe.layers import SSM

    torch.manual_seed(0)
    layer = SSM(8, d_state=4, chunk_size=3)
    u = torch.randn(2, 7, 8)
    ref, _ = layer(u)
    out, _ = layer.to(torch.bfloat16)(u.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_gpu_extra_pins_the_versions_the_calls_are_written_for() -> None:
    import tomllib
    from pathlib import Path

    extra = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert sorted(extra) == sorted(kernels.PINS.values())
