"""One linear layer with LoRA adapters: :class:`LoRALinear` and its :class:`AdapterSpec`.

A LoRA adapter adds a low-rank update to a frozen linear layer::

    y = x W^T + b + s * dropout(x) A^T B^T,      s = alpha / r

with ``A`` (r x in, Kaiming-uniform init) and ``B`` (out x r, zero init), so a fresh adapter
leaves the model's outputs unchanged. The model-level helpers (inject, switch, merge, save,
load) are in :mod:`taskmoe.layers.lora`, which also re-exports this class.

Design choices:

- **Same state-dict keys as the plain layer.** ``LoRALinear`` registers the wrapped layer's own
  ``weight``/``bias`` Parameters (the same objects, so weight tying survives) under the same
  names, plus ``lora_A.<adapter>`` / ``lora_B.<adapter>``, and calls the wrapped layer's own
  forward for the base path (so a subclass of ``nn.Linear`` keeps its own behaviour).
- **Several named adapters per layer**; at most one is active (``layer.active``), and
  ``layer.enabled`` switches it on/off without touching weights.
- **Merge is idempotent and unmerge is bit-exact**: ``merge()`` keeps a copy of the original
  weight and ``unmerge()`` copies it back (no ``W - s B A`` round-off), at the cost of one
  extra copy of each wrapped weight while merged. Merging an already merged layer is a no-op;
  a different adapter is unmerged first. While merged, ``state_dict()`` still reports the
  original (unmerged) weight, so saving a merged model never bakes the adapter in. Switching
  the adapter off or to another one unmerges first. A weight shared with another module (a
  tied head) is never merged, because that would change the other module too.
- **A 4-bit base** (:class:`~taskmoe.layers.quant.Int4Linear`, inference only) can be wrapped, or
  swapped in under existing adapters with :meth:`LoRALinear.set_base` (QLoRA-style serving: the
  adapters stay float32). Such a layer has no float ``weight`` and refuses to merge.
- **Mixed batches are exact**: ``row_mask`` (bool, (B,)) applies the adapter to those rows only;
  the others get ``base(x) + 0``, which equals the base output bit for bit. ``rows`` (a
  :class:`~taskmoe.layers.multi_lora.RowAdapters`) gives each row its own adapter.

Glossary: r = rank, alpha = scaling numerator, s = alpha / r, A = down projection (r, in),
B = up projection (out, r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taskmoe.errors import ConfigError
from taskmoe.layers.quant import LINEAR_TYPES, Int4Linear

__all__ = ["AdapterSpec", "LoRALinear"]


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one named adapter on one layer."""

    rank: int
    alpha: float
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A linear layer with frozen base weights and any number of named low-rank adapters.

    Build from an existing ``nn.Linear``: the base ``weight``/``bias`` Parameters are reused
    (not copied) and frozen. Use :meth:`add_adapter` to attach adapters; ``active`` names the
    adapter applied when ``enabled`` is true.
    """

    def __init__(self, base: nn.Linear | Int4Linear) -> None:
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise ConfigError(f"LoRALinear wraps nn.Linear or Int4Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        if isinstance(base, Int4Linear):
            self._set_quantized(base)
        else:
            self._base = (base,)  # not registered: its Parameters are registered here, under the same names
            self.weight = base.weight
            self.bias = base.bias
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active: str | None = None
        self.enabled: bool = True
        self.row_mask: torch.Tensor | None = None  # (B,) bool, set by use_adapter(rows=...)
        self.rows = None  # a taskmoe.layers.multi_lora.RowAdapters: one adapter per row (overrides active)
        self.merged: str | None = None
        self.weight_shared: bool = False  # set by inject when the weight is tied elsewhere
        self._original: torch.Tensor | None = None
        self.train(base.training)  # a wrapped eval-mode model stays in eval mode (dropout off)

    def _set_quantized(self, base: Int4Linear) -> None:
        self._base = (base,)
        self.quantized_base = base  # registered, so its buffers move with the layer
        for name in ("weight", "bias"):  # the float weight (and the bias, now inside the base) are dropped
            if name in self.__dict__:
                delattr(self, name)
            self.register_parameter(name, None)

    @property
    def quantized(self) -> bool:
        """True when the base is a 4-bit :class:`~taskmoe.layers.quant.Int4Linear`."""
        return self.weight is None

    def unwrap_base(self) -> nn.Module:
        """The wrapped base layer (an ``nn.Linear``, or an ``Int4Linear`` once quantized)."""
        return self._base[0]

    def set_base(self, base: Int4Linear) -> None:
        """Swap in a 4-bit base for this layer's float one (inference; the float weight is dropped)."""
        if self.merged is not None:
            raise ConfigError("cannot swap the base of a merged LoRA layer; unmerge first")
        if (base.in_features, base.out_features) != (self.in_features, self.out_features):
            raise ConfigError(f"new base is ({base.in_features} -> {base.out_features}), layer is "
                              f"({self.in_features} -> {self.out_features})")
        self._set_quantized(base)
        self._stack_cache = None

    # -- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Attach adapter ``name``: A ~ Kaiming-uniform (r, in), B = 0 (out, r)."""
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if name in self.specs:
            raise ConfigError(f"adapter '{name}' already exists on this layer")
        if self.quantized:  # float32 adapters on a 4-bit base
            dev, dt = self.quantized_base.scales_zeros.device, torch.float32
        else:
            dev, dt = self.weight.device, self.weight.dtype
        a = torch.empty(rank, self.in_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # same init as nn.Linear's weight
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        self.specs[name] = AdapterSpec(rank=rank, alpha=float(alpha), dropout=float(dropout))
        self._stack_cache = None  # per-row adapters' stacked weights (taskmoe.layers.multi_lora) are rebuilt
        if self.active is None:
            self.active = name

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A, shape (out, in)."""
        return self.specs[name].scale * (self.lora_B[name] @ self.lora_A[name])

    def set_active(self, name: str | None) -> None:
        """Activate adapter ``name`` (None switches adapters off); unmerges a different merge."""
        if name is not None and name not in self.specs:
            raise ConfigError(f"adapter '{name}' not on this layer (has {sorted(self.specs)})")
        if self.merged is not None and self.merged != name:
            self.unmerge()
        if name is None:
            self.enabled = False
        else:
            self.active, self.enabled = name, True

    # -- merge ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the active one) into the weight. Idempotent."""
        name = name or self.active
        if name is None or name not in self.specs:
            raise ConfigError(f"cannot merge adapter {name!r}: layer has {sorted(self.specs)}")
        if self.merged == name:
            return
        if self.quantized:
            raise ConfigError("cannot merge a LoRA adapter into a 4-bit base; load the float backbone to merge")
        if self.weight_shared:
            raise ConfigError("refusing to merge a LoRA adapter into a weight shared with another module (tied weights)")
        if self.merged is not None:
            self.unmerge()
        self._original = self.weight.detach().clone()
        self.weight.add_(self.delta_weight(name).to(self.weight.dtype))
        self.merged, self.active, self.enabled = name, name, True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight. A no-op when nothing is merged."""
        if self.merged is None:
            return
        assert self._original is not None
        self.weight.copy_(self._original)
        self._original, self.merged = None, None

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base[0](x)  # the wrapped layer's own forward (keeps e.g. taskmoe Linear's decode path)
        if self.rows is not None:  # per-row adapters (taskmoe.layers.multi_lora): the base once + segments
            return self.rows.apply(self, x, y)
        if self.merged is not None:
            if self.row_mask is not None:
                raise ConfigError("a row mask cannot be used while the adapter is merged; unmerge first")
            return y
        if not self.enabled or self.active is None:
            return y
        spec = self.specs[self.active]
        h = F.dropout(x, spec.dropout, self.training) if spec.dropout > 0 else x
        delta = F.linear(F.linear(h, self.lora_A[self.active]), self.lora_B[self.active]) * spec.scale
        if self.row_mask is not None:
            m = self.row_mask.to(delta.dtype)
            if m.shape[0] != x.shape[0]:
                raise ConfigError(f"adapter row mask has {m.shape[0]} rows but the input batch has {x.shape[0]}")
            delta = delta * m.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)
        return y + delta

    # -- state dict: report the unmerged base weight ---------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._original is not None:
            destination[prefix + "weight"] = self._original if keep_vars else self._original.detach()

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.unmerge()
        super()._load_from_state_dict(*args, **kwargs)

    def unwrap(self) -> nn.Linear:
        """The wrapped linear layer itself, with its original (unmerged) weights."""
        self.unmerge()
        base = self._base[0]
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        ad = ", ".join(f"{n}(r={s.rank}, alpha={s.alpha:g})" for n, s in self.specs.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ad}], active={self.active}, " \
               f"enabled={self.enabled}, merged={self.merged}"
