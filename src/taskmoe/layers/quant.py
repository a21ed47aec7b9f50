"""Weight-only quantized linear layers for inference: :class:`Int4Linear`, :class:`Int8Linear`, :func:`quantize_linears`.

:class:`Int4Linear` holds one ``nn.Linear``'s weight as group-wise int4 codes with a per-group
scale and minimum (:mod:`taskmoe.ops.int4`, GGUF ``Q4_1``'s grid) and computes ``x W~^T + b``
with activations rounded to bfloat16 inside the matmul and the output back in the input's
dtype. Optionally it also keeps a bfloat16 copy of the *quantized* weight (the same 4-bit grid values)
for inputs of many rows: the int4 kernel is the fastest at decode's few rows, a bfloat16 GEMM at
prefill's hundreds (both measured on this CPU); the copy costs 2 bytes per weight. It has ``in_features``/``out_features`` like ``nn.Linear``, so LoRA wraps it the same way
(QLoRA-style: the adapters stay float32 on top of the 4-bit base, see
:class:`~taskmoe.layers.lora_linear.LoRALinear`), but it has no float ``weight`` and no gradient:
it is an inference layer. A quantized model cannot be saved as a checkpoint (the float weights
are gone); the backbone folder on disk stays the float32 source of truth.

:func:`quantize_linears` swaps every ``nn.Linear`` under a module (and the base of every LoRA
layer) for an :class:`Int4Linear`, skipping layers whose input size the group size does not
divide, and returns the names it changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.errors import ConfigError
from taskmoe.ops.int4 import Int4Weight, dequantize_int4, int4_linear, pack_int4, quantize_int4
from taskmoe.ops.int8 import int8_linear, quantize_int8

__all__ = ["Int4Linear", "Int8Linear", "quantize_linears", "LINEAR_TYPES", "DENSE_ABOVE"]

DENSE_ABOVE = 32
"""Rows above which a layer with a bfloat16 copy uses it (measured here: the int4 kernel wins up to ~32 rows
of a 576 x 1536 weight, a bfloat16 GEMM beyond; prefill is hundreds of rows)."""


class Int4Linear(nn.Module):
    """A frozen linear layer with 4-bit group-wise weights (built with :meth:`from_linear`)."""

    def __init__(self, weight: Int4Weight, bias: Tensor | None, dense: Tensor | None = None,
                 dense_above: int = DENSE_ABOVE) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = weight.in_features, weight.out_features, weight.group_size
        self.kernel = weight.kernel
        self.dense_above = dense_above
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales_zeros", weight.scales_zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("dense", dense)  # (N, K) bfloat16 copy of the 4-bit weight, or None

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None, group_size: int = 32, *, dense: bool = False,
                    dense_above: int = DENSE_ABOVE) -> "Int4Linear":
        """Quantize ``weight`` (out, in) (the bias stays float); ``dense`` also keeps a bfloat16 copy of the
        quantized weight for inputs of more than ``dense_above`` rows (prefill)."""
        q, scale, minimum = quantize_int4(weight, group_size)
        copy = dequantize_int4(q, scale, minimum).to(torch.bfloat16) if dense else None
        return cls(pack_int4(q, scale, minimum, group_size), bias, copy, dense_above)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, *, dense: bool = False,
                    dense_above: int = DENSE_ABOVE) -> "Int4Linear":
        """:meth:`from_weight` of an ``nn.Linear``."""
        return cls.from_weight(linear.weight, linear.bias, group_size, dense=dense, dense_above=dense_above)

    def int4_weight(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales_zeros, self.group_size, self.out_features, self.in_features, self.kernel)

    def forward(self, x: Tensor) -> Tensor:
        if self.dense is not None and x.numel() > self.dense_above * self.in_features:
            y = F.linear(x.to(torch.bfloat16), self.dense).to(x.dtype)  # many rows: a bfloat16 GEMM
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return int4_linear(x, self.int4_weight(), self.bias)

    def extra_repr(self) -> str:
        dense = f", bf16 above {self.dense_above} rows" if self.dense is not None else ""
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, " \
               f"kernel={'cpu-int4' if self.kernel else 'dequantize'}{dense}"


class Int8Linear(nn.Module):
    """A frozen bias-free linear layer with per-row int8 weights (:mod:`taskmoe.ops.int8`), for a model's head."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        q, scale = quantize_int8(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.q, self.scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per row"


LINEAR_TYPES = (nn.Linear, Int4Linear)
"""What LoRA can wrap and an adapter can load into."""


def _divisible(layer: nn.Linear, group_size: int) -> bool:
    return layer.in_features % group_size == 0


def quantize_linears(module: nn.Module, group_size: int = 32, *, dense: bool = False) -> list[str]:
    """Replace every ``nn.Linear`` under ``module`` (and every LoRA layer's base) with an :class:`Int4Linear`.

    A layer whose weight is shared with another module (a tied head) or whose in_features
    ``group_size`` does not divide stays float. ``dense`` keeps a bfloat16 copy of each quantized weight
    for inputs of many rows (:class:`Int4Linear`). Returns the names quantized. Raises ConfigError on a merged LoRA layer (its
    weight holds an adapter, so quantizing it would bake that adapter into the base).
    """
    from taskmoe.layers.lora_linear import LoRALinear

    counts: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    done: list[str] = []
    for name, mod in list(module.named_modules()):
        if not name:
            continue
        if isinstance(mod, LoRALinear):
            base = mod.unwrap_base()
            if isinstance(base, nn.Linear) and _divisible(base, group_size) and counts.get(id(base.weight), 0) <= 1:
                if mod.merged is not None:
                    raise ConfigError(f"{name}: cannot quantize a merged LoRA layer; unmerge first")
                mod.set_base(Int4Linear.from_linear(base, group_size, dense=dense))
                done.append(name)
            continue
        if type(mod) is nn.Linear and _divisible(mod, group_size) and counts.get(id(mod.weight), 0) <= 1:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if isinstance(parent, LoRALinear):
                continue  # handled through the wrapper above
            setattr(parent, child, Int4Linear.from_linear(mod, group_size, dense=dense))
            done.append(name)
    return done
