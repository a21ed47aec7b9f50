"""Optional GPU kernels, loaded lazily and used only for CUDA tensors.

The pure-PyTorch forms in this package are the default and always work. When a fused kernel
library is importable *and* every input tensor lives on a CUDA device, the fast forms hand the
work to it (the ``[gpu]`` extra pins the versions whose API is called here, :data:`PINS`):

- ``fla-core`` (flash-linear-attention, >= 0.5): ``fla.ops.simple_gla.chunk_simple_gla(q, k, v,
  g, scale=, initial_state=, output_final_state=)`` computes the same scalar-decay linear attention
  as :func:`taskmoe.ops.linear_attention`. Its layout is ``(B, T, H, K)`` (time before heads),
  ``g`` ``(B, T, H)`` natural-log decay, state ``(B, H, K, V)``: the same as ours, so nothing is
  transposed. Since 0.5 the ``head_first`` argument is *removed* (passing it raises), and 0.3-0.4
  defaulted it to False and refused True; so the call passes no layout flag and the pin keeps the
  time-first layout. Prefill with a state uses the kernel too (``initial_state``).
- ``mamba-ssm`` (>= 2.2): ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn(u, delta, A,
  B, C, D, z, return_last_state=True)`` computes the selective scan of
  :func:`taskmoe.ops.selective_scan` in the channel-major layout ``u, delta, z`` ``(B, E, T)``,
  ``B, C`` ``(B, N, T)``, with ``A`` ``(E, N)`` in float32 (as mamba's own block keeps it). It takes
  no initial state, so a prefill that carries one in runs the kernel from zero and adds the state's
  exact closed-form contribution (:func:`taskmoe.ops.selective_scan`).

Design choices: the import is attempted once per library. A failure (missing package, missing
triton/CUDA toolchain, or any error raised while importing) is remembered and **logged once**
with its reason (:func:`note`), never raised, so a GPU user learns why the PyTorch path ran;
callers log the other reasons a kernel is skipped (an unsupported dtype) the same way.
:func:`kernel` is the one decision point, so tests can monkeypatch :func:`_import` to simulate an
installed or missing library.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# name -> (module path, attribute)
KERNELS: dict[str, tuple[str, str]] = {
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
}
PINS: dict[str, str] = {"simple_gla": "fla-core>=0.5,<0.7", "selective_scan": "mamba-ssm>=2.2,<2.4"}
"""The versions whose calling convention this module uses (the ``[gpu]`` extra in pyproject.toml)."""

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input dtypes the fused kernels take; anything else (e.g. float64) stays on the PyTorch path."""

_CACHE: dict[str, Callable[..., Any] | None] = {}
_NOTED: set[str] = set()


def note(name: str, reason: str) -> None:
    """Log (once per kernel and reason) why kernel ``name`` is not used."""
    key = f"{name}: {reason}"
    if key not in _NOTED:
        _NOTED.add(key)
        log.warning("GPU kernel %s (%s) not used: %s; running the PyTorch path", name, PINS.get(name, "?"), reason)


def _import(module: str, attr: str) -> Callable[..., Any] | None:
    """Import ``module.attr``; None if the library (or its toolchain) is unavailable (the reason is logged)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:  # noqa: BLE001 - any import-time failure means "not available"
        name = next((n for n, (m, a) in KERNELS.items() if (m, a) == (module, attr)), module)
        note(name, f"cannot import {module}.{attr} ({type(e).__name__}: {e})")
        return None


def available(name: str) -> bool:
    """Whether the named kernel library can be imported (cached after the first attempt)."""
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; known: {sorted(KERNELS)}")
    if name not in _CACHE:
        _CACHE[name] = _import(*KERNELS[name])
        if _CACHE[name] is None and not any(k.startswith(f"{name}: ") for k in _NOTED):
            note(name, "the library is not importable")
    return _CACHE[name] is not None


def _on_cuda(tensors: list[torch.Tensor]) -> bool:
    return bool(tensors) and all(t.is_cuda for t in tensors)


def kernel(name: str, *tensors: torch.Tensor | None) -> Callable[..., Any] | None:
    """The named GPU kernel if it is importable and every given tensor is on CUDA in a kernel dtype, else None."""
    given = [t for t in tensors if t is not None]
    if not _on_cuda(given):
        return None
    if not available(name):
        return None
    bad = sorted({str(t.dtype) for t in given if t.dtype not in KERNEL_DTYPES})
    if bad:
        note(name, f"dtype {', '.join(bad)} is not one of {[str(d) for d in KERNEL_DTYPES]}")
        return None
    return _CACHE[name]


def reset_cache() -> None:
    """Forget import results and logged reasons (tests use this after monkeypatching :func:`_import`)."""
    _CACHE.clear()
    _NOTED.clear()
