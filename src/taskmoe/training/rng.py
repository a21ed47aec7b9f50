"""Capture, restore and seed every random number generator training touches, without pickle.

An ``RNGState`` splits into tensors (torch CPU state as a ``uint8`` tensor, one per CUDA
device if CUDA is available) and JSON (python ``random`` and numpy's legacy global state), so
checkpoints store it as safetensors + JSON like everything else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class RNGState:
    """The state of torch (CPU and CUDA), python ``random`` and numpy's global generator."""

    torch_cpu: torch.Tensor
    python: list[Any]
    numpy: dict[str, Any]
    cuda: list[torch.Tensor] = field(default_factory=list)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}torch_cpu": self.torch_cpu}
        out.update({f"{prefix}cuda.{i}": t for i, t in enumerate(self.cuda)})
        return out

    def json(self) -> dict[str, Any]:
        return {"python": self.python, "numpy": self.numpy, "cuda_devices": len(self.cuda)}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], js: dict[str, Any], prefix: str = "") -> "RNGState":
        cuda = [tensors[f"{prefix}cuda.{i}"] for i in range(int(js.get("cuda_devices", 0)))]
        return cls(torch_cpu=tensors[f"{prefix}torch_cpu"], python=js["python"], numpy=js["numpy"], cuda=cuda)


def capture_rng() -> RNGState:
    """Snapshot the current state of every generator."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return RNGState(
        torch_cpu=torch.get_rng_state().clone(),
        python=[version, list(internal), gauss],
        numpy={"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        cuda=[t.clone() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    )


def restore_rng(state: RNGState) -> None:
    """Put every generator back into ``state`` (CUDA only if both sides have the same devices)."""
    torch.set_rng_state(state.torch_cpu.to(torch.uint8).cpu())
    version, internal, gauss = state.python
    random.setstate((version, tuple(internal), gauss))
    n = state.numpy
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if state.cuda and torch.cuda.is_available() and len(state.cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state.cuda)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python ``random`` and numpy's global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
