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
from taskmoe.ops.segmented_lora import plan_segments, row_scale_mask, segmented_lora, stacked_lora

__all__ = ["RowAdapters", "row_adapters", "use_row_adapters", "set_row_adapters"]


class RowAdapters:
    """Adapter ``names[ids[i]]`` for batch row ``i`` (``ids[i] == -1``: base model)."""

    def __init__(self, names: Sequence[str], ids: Tensor) -> None:
        self.names = list(names)
        self.ids = ids
        self._plan = None
        self._masks: dict[tuple, Tensor] = {}  # (ranks, scales) -> row scale mask, shared by alike layers

    @property
    def plan(self):
        if self._plan is None:
            self._plan = plan_segments(self.ids, len(self.names))
        return self._plan

    def delta(self, layer: LoRALinear, x: Tensor) -> Tensor:
        """The low-rank updates of ``layer`` for rows ``x`` (B, ..., in) -> (B, ..., out)."""
        if layer.merged is not None:
            raise ConfigError("per-row adapters cannot run on a merged LoRA layer; unmerge first")
        if not torch.is_grad_enabled():
            return self._stacked(layer, x)
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

    def _stacked(self, layer: LoRALinear, x: Tensor) -> Tensor:
        present = [n for n in self.names if n in layer.specs]
        if not present:
            return x.new_zeros(*x.shape[:-1], layer.out_features)
        params = [(layer.lora_A[n], layer.lora_B[n]) for n in present]
        key = (tuple(present), tuple((a.data_ptr(), a._version, b.data_ptr(), b._version) for a, b in params))
        cache = getattr(layer, "_stack_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, torch.cat([a for a, _ in params]), torch.cat([b for _, b in params], 1))
            layer._stack_cache = cache
        ranks = tuple(layer.specs[n].rank for n in present)
        scales = tuple(layer.specs[n].scale for n in present)
        mkey = (tuple(present), ranks, scales)
        if mkey not in self._masks:
            index = {n: i for i, n in enumerate(present)}
            local = torch.tensor([index.get(self.names[k], -1) if k >= 0 else -1 for k in self.ids.tolist()],
                                 dtype=torch.long, device=self.ids.device)
            self._masks[mkey] = row_scale_mask(local, ranks, scales, dtype=x.dtype)
        return stacked_lora(x, cache[1], cache[2], self._masks[mkey])


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
def use_row_adapters(model: nn.Module, rows: RowAdapters | Sequence[str | None]) -> Iterator[nn.Module]:
    """Context manager: run ``model`` with a per-row adapter assignment, then restore the previous one."""
    if not isinstance(rows, RowAdapters):
        rows = row_adapters(model, rows)
    layers = lora_layers(model)
    saved = {n: m.rows for n, m in layers.items()}
    set_row_adapters(model, rows)
    try:
        yield model
    finally:
        for n, m in layers.items():
            m.rows = saved[n]
