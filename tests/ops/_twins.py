"""Helpers shared by the op twin tests: compare outputs, final states and all input gradients."""

from __future__ import annotations

from typing import Callable

import torch

TOL = dict(rtol=1e-5, atol=2e-5)  # fp32


def run_with_grads(fn: Callable, inputs: dict[str, torch.Tensor | None], kwargs: dict, probe: list[torch.Tensor]):
    """Call fn on fresh leaf copies of inputs; return (outputs, grads) for loss = sum_i <out_i, probe_i>."""
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_(True)) for k, v in inputs.items()}
    outs = fn(**leaves, **kwargs)
    loss = sum((o * p).sum() for o, p in zip(outs, probe))
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return [o.detach() for o in outs], grads


def assert_twins(fast: Callable, ref: Callable, inputs: dict, fast_kw: dict | None = None, ref_kw: dict | None = None,
                 tol: dict | None = None) -> None:
    tol = tol or TOL
    probe_outs = ref(**inputs, **(ref_kw or {}))
    probe = [torch.randn_like(o) for o in probe_outs]
    out_f, g_f = run_with_grads(fast, inputs, fast_kw or {}, probe)
    out_r, g_r = run_with_grads(ref, inputs, ref_kw or {}, probe)
    for name, a, b in zip(("output", "final state"), out_f, out_r):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    assert g_f.keys() == g_r.keys()
    for k in g_r:
        assert g_r[k] is not None and g_f[k] is not None, k
        torch.testing.assert_close(g_f[k], g_r[k], **tol, msg=lambda m: f"grad of {k}: {m}")
