"""Optional GPU kernels, loaded lazily and used only for CUDA tensors.

The pure-PyTorch forms in this package are the default and always work. When a fused kernel
library is importable *and* every input tensor lives on a CUDA device, the fast forms hand the
work to it:

- ``fla-core`` (flash-linear-attention): ``fla.ops.simple_gla.chunk_simple_gla`` computes the
  same scalar-decay linear attention as :func:`taskmoe.ops.linear_attention`
  (layout ``(B, T, H, D)``, natural-log decay ``g`` of shape ``(B, T, H)``).
- ``mamba-ssm``: ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` computes the
  selective scan of :func:`taskmoe.ops.selective_scan` (layout ``(B, D, T)``; it takes no initial
  state, so a call that carries one in stays on the PyTorch path).

Design choices: the import is attempted once per library and its failure (missing package,
missing triton/CUDA toolchain, or any error raised while importing) is remembered, never raised;
:func:`kernel` is the one decision point, so tests can monkeypatch :func:`_import` to simulate
an installed or missing library.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

# name -> (module path, attribute)
KERNELS: dict[str, tuple[str, str]] = {
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
}
_CACHE: dict[str, Callable[..., Any] | None] = {}


def _import(module: str, attr: str) -> Callable[..., Any] | None:
    """Import ``module.attr``; None if the library (or its toolchain) is unavailable."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 - any import-time failure means "not available"
        return None


def available(name: str) -> bool:
    """Whether the named kernel library can be imported (cached after the first attempt)."""
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; known: {sorted(KERNELS)}")
    if name not in _CACHE:
        _CACHE[name] = _import(*KERNELS[name])
    return _CACHE[name] is not None


def _on_cuda(tensors: list[torch.Tensor]) -> bool:
    return bool(tensors) and all(t.is_cuda for t in tensors)


def kernel(name: str, *tensors: torch.Tensor | None) -> Callable[..., Any] | None:
    """The named GPU kernel if it is importable and every given tensor is on CUDA, else None."""
    if not _on_cuda([t for t in tensors if t is not None]):
        return None
    return _CACHE[name] if available(name) else None


def reset_cache() -> None:
    """Forget import results (tests use this after monkeypatching :func:`_import`)."""
    _CACHE.clear()
