"""Many LoRA adapters in one forward: each batch row runs with its own adapter (or none).

:class:`RowAdapters` is one forward's assignment (adapter names + per-row ids, planned once with
:func:`~taskmoe.ops.segmented_lora.plan_segments`); :func:`use_row_adapters` hands the same object
to every :class:`~taskmoe.layers.lora.LoRALinear` of a model, which then computes::

    y = W x  (+ b)            once, for all rows
      + segmented_lora(x)     each adapter's s B A x on its own contiguous segment of rows

so a batch whose rows use K different adapters costs one base forward plus K low-rank updates per
layer (no per-row loop, no batch split). Without gradients (decoding, evaluation) the layer uses the
stacked form (:func:`~taskmoe.ops.segmented_lora.stacked_lora`: three ops whatever K), with the
adapters' stacked A/B cached on the layer and rebuilt when a weight changes (its version counter);
with gradients (training) it uses the segmented form, which differentiates into each adapter. Rows whose adapter a layer does not carry (or id ``-1``)
get exactly the base output. No LoRA dropout is applied in this mode (it is the inference and
evaluation path); a training layer with dropout refuses it. A merged layer refuses it too, since
its weight already holds one adapter.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from taskmoe.errors import ConfigError
from taskmoe.layers.lora import LoRALinear, adapter_names, lora_layers
from taskmoe.ops.segmented_lora import (batched_lora, gather_rows, plan_batches, plan_segments, segmented_lora,
                                        stack_adapters)

__all__ = ["RowAdapters", "row_adapters", "use_row_adapters", "set_row_adapters"]


class RowAdapters:
    """Adapter ``names[ids[i]]`` for batch row ``i`` (``ids[i] == -1``: base model)."""

    def __init__(self, names: Sequence[str], ids: Tensor) -> None:
        self.names = tuple(names)
        self.ids = ids
        self._plan = None  # the segmented form's (training)
        self._batch_plan = None  # the batched form's (no gradients)
        self._gathered: tuple[Tensor, Tensor] | None = None  # the last input and its gathered rows

    @property
    def plan(self):
        if self._plan is None:
            self._plan = plan_segments(self.ids, len(self.names))
        return self._plan

    def apply(self, layer: LoRALinear, x: Tensor, y: Tensor) -> Tensor:
        """``y`` (the base output of ``x``) plus each row's low-rank update of ``layer``."""
        if layer.merged is not None:
            raise ConfigError("per-row adapters cannot run on a merged LoRA layer; unmerge first")
        if not torch.is_grad_enabled():
            return self._batched(layer, x, y)
        return y + self._segmented(layer, x)

    def _segmented(self, layer: LoRALinear, x: Tensor) -> Tensor:
        """The low-rank updates (B, ..., out) of rows ``x``, differentiable into each adapter (training)."""
        weights = []
        for n in self.names:
            spec = layer.specs.get(n)
            if spec is None:
                weights.append(None)
                continue
            if layer.training and spec.dropout > 0:
                raise ConfigError(f"per-row adapters apply no dropout: adapter '{n}' has dropout {spec.dropout} "
                                  "and the layer is training (use eval mode, or train one adapter at a time)")
            weights.append((layer.lora_A[n], layer.lora_B[n], spec.scale))
        return segmented_lora(x, weights, self.plan, layer.out_features)

    @property
    def batch_plan(self):
        if self._batch_plan is None:
            self._batch_plan = plan_batches(self.ids, len(self.names))
        return self._batch_plan

    def _batched(self, layer: LoRALinear, x: Tensor, y: Tensor) -> Tensor:
        """``y`` plus the low-rank updates of rows ``x`` as two bmm on cached adapter stacks (no gradients)."""
        cache = getattr(layer, "_stack_cache", None)
        if cache is None or cache[0] != (self.names, x.dtype) or any(p._version != v for p, v in cache[1]):
            cache = self._stack(layer, x.dtype)
            layer._stack_cache = cache
        if cache[2] is None:  # the layer carries none of these adapters
            return y
        if self._gathered is None or self._gathered[0] is not x:  # q/k/v (and gate/up) read the same x: gather once
            self._gathered = (x, gather_rows(x, self.batch_plan))
        return batched_lora(x, cache[2], cache[3], self.batch_plan, xs=self._gathered[1], base=y)

    def _stack(self, layer: LoRALinear, dtype: torch.dtype) -> tuple:
        """(key, [(param, version)], A_stack, B_stack) of ``layer`` for these names; checked by version each call
        (a new adapter on the layer clears it: :meth:`LoRALinear.add_adapter`)."""
        params = [(layer.lora_A[n], layer.lora_B[n], layer.specs[n].scale) if n in layer.specs else None
                  for n in self.names]
        versions = [(t, t._version) for p in params if p is not None for t in p[:2]]
        if not versions:
            return ((self.names, dtype), versions, None, None)
        with torch.no_grad():
            like = versions[0][0].to(dtype)
            a_stack, b_stack = stack_adapters(params, layer.in_features, layer.out_features, like)
        return ((self.names, dtype), versions, a_stack, b_stack)


def row_adapters(model: nn.Module, per_row: Sequence[str | None], device: torch.device | None = None) -> RowAdapters:
    """A :class:`RowAdapters` for adapter names per row (None = base), checking every name exists."""
    known = adapter_names(model)
    unknown = sorted({n for n in per_row if n is not None and n not in known})
    if unknown:
        raise ConfigError(f"adapters {unknown} are not in this model (it has {known})")
    names = sorted({n for n in per_row if n is not None})
    index = {n: i for i, n in enumerate(names)}
    ids = torch.tensor([-1 if n is None else index[n] for n in per_row], dtype=torch.long, device=device)
    return RowAdapters(names, ids)


def set_row_adapters(model: nn.Module, rows: RowAdapters | None) -> None:
    """Give every LoRA layer of ``model`` this per-row assignment (None: back to the single-adapter switch)."""
    for layer in lora_layers(model).values():
        layer.rows = rows


@contextlib.contextmanager
def use_row_adapters(model: nn.Module, rows: RowAdapters | Sequence[str | None], *,
                     layers: dict[str, LoRALinear] | None = None) -> Iterator[nn.Module]:
    """Context manager: run ``model`` with a per-row adapter assignment, then restore the previous one.

    ``layers``: the model's LoRA layers when the caller already has them (saves a module walk per forward)."""
    if not isinstance(rows, RowAdapters):
        rows = row_adapters(model, rows)
    layers = lora_layers(model) if layers is None else layers
    saved = {n: m.rows for n, m in layers.items()}
    set_row_adapters(model, rows)
    try:
        yield model
    finally:
        for n, m in layers.items():
            m.rows = saved[n]
