"""Rotary position embeddings (RoPE): the inverse frequencies (plain, linear- or Llama-3-scaled) and the rotation.

Per head of size d, pair ``(i, i + d/2)`` is rotated by the angle ``p * w_i`` at position p
(the "rotate half" layout of GPT-NeoX and Hugging Face Llama)::

    w_i = 1 / theta**(2i / d)                          i = 0 .. d/2 - 1     (default)
    w_i = w_i / factor                                                      ('linear' scaling)
    llama3: wavelength l_i = 2 pi / w_i; with L = original context, lo = L / low_freq_factor,
            hi = L / high_freq_factor:  l_i < hi -> w_i;  l_i > lo -> w_i / factor;
            otherwise (1 - s) w_i / factor + s w_i,  s = (L / l_i - low_freq_factor) / (high - low)

The formulas follow ``transformers.modeling_rope_utils`` term by term (same float32 operations), so
a converted checkpoint rotates exactly as it did in ``transformers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from taskmoe.config import Config, check, check_min, doc

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class RopeScaling(Config):
    rope_type: str = doc("default", f"frequency scaling: one of {ROPE_TYPES}")
    factor: float = doc(1.0, "context extension factor ('linear' and 'llama3')")
    low_freq_factor: float = doc(1.0, "llama3: wavelengths above original/low_freq_factor are divided by factor")
    high_freq_factor: float = doc(4.0, "llama3: wavelengths below original/high_freq_factor are kept")
    original_max_position_embeddings: int = doc(8192, "llama3: the context length the model was pretrained on")

    def validate(self) -> None:
        check(self.rope_type in ROPE_TYPES,
              f"RopeScaling.rope_type {self.rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
        check_min(self, ("factor",), strict=True)
        check(self.rope_type != "llama3" or self.high_freq_factor > self.low_freq_factor,
              f"RopeScaling: llama3 needs high_freq_factor > low_freq_factor, got "
              f"{self.high_freq_factor} <= {self.low_freq_factor}")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """The (head_dim / 2,) float32 inverse frequencies ``w_i`` (see the module docstring)."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head size, got {head_dim}")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    s = scaling
    old = s.original_max_position_embeddings
    lo_wave, hi_wave = old / s.low_freq_factor, old / s.high_freq_factor
    wave = 2 * math.pi / inv
    scaled = torch.where(wave > lo_wave, inv / s.factor, inv)
    smooth = (old / wave - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wave < hi_wave) * ~(wave > lo_wave)
    return torch.where(medium, smoothed, scaled)


def rope(x: Tensor, pos: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotary embedding of ``x`` (B, H, T, d) at positions ``pos`` (T,) or (B, T).

    ``out[..., i] = x_i cos(p w_i) - x_{i+d/2} sin(p w_i)``, ``out[..., i+d/2] = x_i sin + x_{i+d/2} cos``.
    """
    ang = pos.to(inv_freq.dtype).unsqueeze(-1) * inv_freq  # (T, d/2) or (B, T, d/2)
    if ang.dim() == 3:
        ang = ang.unsqueeze(1)  # (B, 1, T, d/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
