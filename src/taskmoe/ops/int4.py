"""Weight-only 4-bit linear layers: group-wise asymmetric int4 weights, float activations.

A weight ``W`` (N out, K in) is cut into groups of ``g`` consecutive input columns; each group of
each row keeps a scale ``s`` and a minimum ``m`` and 4-bit codes ``q`` in 0..15::

    s = (max(w) - min(w)) / 15,   m = min(w),   q = round((w - m) / s),   W~ = s * q + m

This is exactly GGUF's ``Q4_1`` block format (g = 32, codes 0..15, per-block scale and minimum),
so a backbone that shipped as Q4_1 and was dequantized on import quantizes back onto its own
grid: the codes come back exactly and only the scale/minimum round-off (bfloat16 here, float16
in the file) differs. The linear layer is then ``y = x W~^T (+ b)``.

- :func:`quantize_int4` is the pure quantizer (codes, scales, minima); :func:`dequantize_int4`
  its inverse; :func:`int4_linear_ref` the plain float32 twin (dequantize, then matmul).
- :func:`pack_int4` / :func:`int4_linear` are the fast form: PyTorch's CPU weight-only int4
  kernel (``_weight_int4pack_mm_for_cpu``, the one torchao and gpt-fast use). It reads an eighth
  of float32's weight bytes, which is what batch-1 decoding is bound by. The kernel is fast only
  with bfloat16 activations, so the input is cast to bfloat16 and the output back to the input's
  dtype (the residual stream stays float32); it needs out_features divisible by 16. It stores ``zero = m + 8 s`` because it computes
  ``(q - 8) * s + zero``. On another device, or a torch without the kernel, :func:`int4_linear`
  falls back to dequantize-then-matmul (same result up to activation rounding); a weight packed
  for the CPU kernel refuses an input on another device.

Glossary: N out features, K in features, g group size (K % g == 0), G = K / g groups per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Int4Weight", "quantize_int4", "dequantize_int4", "pack_int4", "int4_linear", "int4_linear_ref",
           "has_int4_kernel", "GROUP_SIZES"]

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes PyTorch's int4 kernel supports


def has_int4_kernel() -> bool:
    """True when this torch has the CPU weight-only int4 kernel."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def quantize_int4(w: Tensor, group_size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (N, K) uint8 in 0..15, scales (N, G) and minima (N, G), float32, of ``w`` (N, K).

    ``s = (max - min) / 15`` per group (a constant group gets ``s = 1`` so ``q = 0``), ``m = min``,
    ``q = round((w - m) / s)`` clamped to 0..15.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_int4: expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"quantize_int4: in_features {k} must be a multiple of a group size in {GROUP_SIZES}, "
                         f"got group size {group_size}")
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((wg - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, lo


def dequantize_int4(q: Tensor, scale: Tensor, minimum: Tensor) -> Tensor:
    """W~ = s * q + m, float32 (N, K), from codes (N, K) and per-group scales/minima (N, G)."""
    n, k = q.shape
    g = k // scale.shape[1]
    return (q.float().reshape(n, -1, g) * scale[..., None] + minimum[..., None]).reshape(n, k)


def int4_linear_ref(x: Tensor, q: Tensor, scale: Tensor, minimum: Tensor, bias: Tensor | None = None) -> Tensor:
    """The plain twin: ``x (..., K) @ dequantize(q, s, m)^T (+ b)`` in float32."""
    y = x.float() @ dequantize_int4(q, scale, minimum).t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


@dataclass
class Int4Weight:
    """One packed weight for :func:`int4_linear`: the kernel's layout, or codes for the fallback."""

    packed: Tensor  # (N, K/2) uint8 (kernel layout), or (N, K) uint8 codes when not packed for the kernel
    scales_zeros: Tensor  # (G, N, 2) bfloat16: s and zero = m + 8 s
    group_size: int
    out_features: int
    in_features: int
    kernel: bool  # True: packed for the CPU kernel


def pack_int4(q: Tensor, scale: Tensor, minimum: Tensor, group_size: int, *, kernel: bool | None = None) -> Int4Weight:
    """Pack codes and per-group scale/minimum for :func:`int4_linear` (the CPU kernel's layout when available)."""
    n, k = q.shape
    fits = n % 16 == 0  # the kernel packs 16 output rows at a time
    use_kernel = has_int4_kernel() and q.device.type == "cpu" and fits if kernel is None else kernel
    if use_kernel and not fits:
        raise ValueError(f"pack_int4: the CPU kernel needs out_features divisible by 16, got {n}")
    zero = minimum + 8.0 * scale
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1) if use_kernel \
        else q.contiguous()
    return Int4Weight(packed, sz, group_size, n, k, bool(use_kernel))


def int4_linear(x: Tensor, w: Int4Weight, bias: Tensor | None = None) -> Tensor:
    """``x (..., K) @ W~^T (+ b)`` with W~ held in 4 bits; returns ``x``'s dtype.

    Kernel path: x cast to bfloat16, ``_weight_int4pack_mm_for_cpu``, cast back. Fallback:
    dequantize (with the same bfloat16 scale/zero) and matmul in x's dtype.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if w.kernel:
        if x.device.type != "cpu":
            raise ValueError(f"int4_linear: this weight is packed for the CPU kernel but the input is on {x.device}; "
                             "quantize on the device that runs it")
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), w.packed, w.group_size,
                                                       w.scales_zeros).to(x.dtype)
    else:
        s, z = w.scales_zeros[..., 0].t().float(), w.scales_zeros[..., 1].t().float()  # (N, G)
        y = x2 @ dequantize_int4(w.packed, s, z - 8.0 * s).to(x.dtype).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, w.out_features)
