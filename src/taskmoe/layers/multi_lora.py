"""Many LoRA adapters in one forward: each batch row runs with its own adapter (or none).

:class:`RowAdapters` is one forward's assignment (adapter names + per-row ids, planned once with
:func:`~taskmoe.ops.segmented_lora.plan_segments`); :func:`use_row_adapters` hands the same object
to every :class:`~taskmoe.layers.lora.LoRALinear` of a model, which then computes::

    y = W x  (+ b)            once, for all rows
      + segmented_lora(x)     each adapter's s B A x on its own contiguous segment of rows

so a batch whose rows use K different adapters costs one base forward plus K low-rank updates per
layer (no per-row loop, no batch split). Rows whose adapter a layer does not carry (or id ``-1``)
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
from taskmoe.ops.segmented_lora import plan_segments, segmented_lora

__all__ = ["RowAdapters", "row_adapters", "use_row_adapters", "set_row_adapters"]


class RowAdapters:
    """Adapter ``names[ids[i]]`` for batch row ``i`` (``ids[i] == -1``: base model)."""

    def __init__(self, names: Sequence[str], ids: Tensor) -> None:
        self.names = list(names)
        self.ids = ids
        self.plan = plan_segments(ids, len(self.names))

    def delta(self, layer: LoRALinear, x: Tensor) -> Tensor:
        """The low-rank updates of ``layer`` for rows ``x`` (B, ..., in) -> (B, ..., out)."""
        if layer.merged is not None:
            raise ConfigError("per-row adapters cannot run on a merged LoRA layer; unmerge first")
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
