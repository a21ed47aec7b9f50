"""Weight-only 8-bit linear layers: per-output-row symmetric int8 weights, float activations.

Each row ``w`` of a weight (N out, K in) keeps one scale and int8 codes::

    s = max|w| / 127,   q = round(w / s) in -127..127,   W~ = s * q

:func:`quantize_int8` is the pure quantizer; :func:`int8_linear_ref` the float32 twin
(dequantize, then matmul); :func:`int8_linear` the fast form, PyTorch's CPU weight-only int8 kernel
(``_weight_int8pack_mm``), fast with bfloat16 activations, so the input is cast to bfloat16 and the
output back to its dtype. Without the kernel (or off CPU) it dequantizes and multiplies.

Used for a backbone's output head (:mod:`taskmoe.models.quantize`): the vocabulary projection is the
largest single weight, and per-row int8 keeps it within ~0.1% perplexity of float32 here while reading
a quarter of the bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quantize_int8", "int8_linear", "int8_linear_ref", "has_int8_kernel"]


def has_int8_kernel() -> bool:
    """True when this torch has the CPU weight-only int8 kernel."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Codes (N, K) int8 in -127..127 and scales (N,) float32 of ``w`` (N, K); an all-zero row gets s = 1."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8: expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    scale = w.abs().amax(1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


def int8_linear_ref(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """The plain twin: ``x (..., K) @ (s * q)^T`` in float32, returned in x's dtype."""
    return (x.float() @ (q.float() * scale[:, None]).t()).to(x.dtype)


def int8_linear(x: Tensor, q: Tensor, scale_bf16: Tensor) -> Tensor:
    """``x (..., K) @ (s * q)^T`` with the int8 kernel on CPU (bfloat16 activations and scales); x's dtype out."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, q.shape[1])
    if has_int8_kernel() and x.device.type == "cpu":
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), q, scale_bf16).to(x.dtype)
    else:
        y = (x2 @ (q.to(x.dtype) * scale_bf16.to(x.dtype)[:, None]).t())
    return y.reshape(*lead, q.shape[0])
