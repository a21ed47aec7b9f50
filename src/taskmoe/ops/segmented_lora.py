"""Segmented low-rank matmul: many LoRA adapters in one batch, each applied to its own rows.

For rows ``i`` with adapter ids ``a_i`` (``-1`` = no adapter) and adapters ``k`` with
``A_k`` (r_k, in), ``B_k`` (out, r_k) and scale ``s_k``::

    delta_i = s_{a_i} * B_{a_i} (A_{a_i} x_i)        (0 where a_i = -1 or adapter a_i is absent)

The base projection ``W x`` is computed once for all rows by the caller; this op adds only the
low-rank updates. Fast form (the Punica / S-LoRA "segmented gather matmul" idea on dense
tensors): rows are sorted by adapter **once** (:func:`plan_segments`, a stable argsort shared by
every layer of a forward), so each adapter's rows are one contiguous segment and each adapter
costs two matmuls on its segment, whatever the batch size — a loop over adapters, never over rows.
Already-sorted rows (the common case when the caller groups by adapter) skip the gather and scatter.
:func:`segmented_lora_ref` is the plain per-row loop twin.

:func:`stacked_lora` is the second fast form, for decoding, where the K-loop's small ops cost more
than the adapters' arithmetic: the adapters' A are stacked to ``A_cat`` (R, in), their B to
``B_cat`` (out, R) (R = sum r_k), and each row keeps only its own adapter's columns::

    delta = ((x A_cat^T) * M) B_cat^T,   M[i, cols of adapter a_i] = s_{a_i}, 0 elsewhere

Three ops per layer whatever K, no gather; the other adapters' columns are multiplied by an exact
zero, so each row still gets exactly its own adapter's update (the A side does K times the tiny
``x A^T`` work, which is noise next to the weight reads). The caller builds (and may cache) the stacks.

Rows are the first axis of ``x``; anything between (time) rides along: ``x`` (N, ..., in).
Glossary: N rows, K adapters, r_k rank of adapter k, s_k = alpha_k / r_k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["SegmentPlan", "plan_segments", "segmented_lora", "stacked_lora", "row_scale_mask", "segmented_lora_ref"]

LowRank = tuple[Tensor, Tensor, float] | None
"""(A (r, in), B (out, r), scale) of one adapter on one layer, or None where the layer lacks it."""


@dataclass(frozen=True)
class SegmentPlan:
    """Rows grouped by adapter: ``order`` sorts them (None: already sorted), ``inverse`` undoes it,
    segment ``k`` is sorted rows ``offsets[k]:offsets[k + 1]``."""

    order: Tensor | None  # (N,) int64
    inverse: Tensor | None  # (N,) int64
    offsets: tuple[int, ...]  # (K + 1,)
    n_rows: int


def plan_segments(ids: Tensor, n_adapters: int) -> SegmentPlan:
    """Plan for per-row adapter ids ``ids`` (N,) in ``[-1, n_adapters)`` (one stable sort, done once)."""
    ids = ids.reshape(-1).long()
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n_adapters):
        raise ValueError(f"adapter ids must be in [-1, {n_adapters}), got {sorted(set(ids.tolist()))[:8]}")
    counts = torch.bincount(ids + 1, minlength=n_adapters + 1).tolist()  # [none, 0, 1, ..., K-1]
    offsets = [counts[0]]
    for c in counts[1:]:
        offsets.append(offsets[-1] + c)
    if ids.numel() < 2 or bool((ids[1:] >= ids[:-1]).all()):
        return SegmentPlan(None, None, tuple(offsets), ids.numel())
    order = torch.sort(ids, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return SegmentPlan(order, inverse, tuple(offsets), ids.numel())


def segmented_lora(x: Tensor, adapters: Sequence[LowRank], plan: SegmentPlan, out_features: int) -> Tensor:
    """``delta`` (N, ..., out) for rows ``x`` (N, ..., in) in their original order (see the module docstring)."""
    if x.shape[0] != plan.n_rows:
        raise ValueError(f"segmented_lora: the plan is for {plan.n_rows} rows, x has {x.shape[0]}")
    xs = x if plan.order is None else x.index_select(0, plan.order)
    pieces = [xs.new_zeros(plan.offsets[0], *x.shape[1:-1], out_features)]  # rows without an adapter
    for k, w in enumerate(adapters):
        lo, hi = plan.offsets[k], plan.offsets[k + 1]
        seg = xs[lo:hi]
        if w is None or hi == lo:
            pieces.append(seg.new_zeros(hi - lo, *x.shape[1:-1], out_features))
            continue
        a, b, scale = w
        pieces.append((seg @ a.t()) @ b.t() * scale)  # (n_k, ..., r_k) -> (n_k, ..., out)
    delta = torch.cat(pieces, 0)
    return delta if plan.inverse is None else delta.index_select(0, plan.inverse)


def row_scale_mask(ids: Tensor, ranks: Sequence[int], scales: Sequence[float], dtype=None) -> Tensor:
    """``M`` (N, R) for :func:`stacked_lora`: row i holds s_{a_i} on adapter a_i's r columns, 0 elsewhere."""
    ids = ids.reshape(-1).long()
    col_owner = torch.repeat_interleave(torch.arange(len(ranks), device=ids.device),
                                        torch.tensor(list(ranks), device=ids.device))  # (R,)
    col_scale = torch.repeat_interleave(torch.tensor(list(scales), dtype=dtype or torch.float32, device=ids.device),
                                        torch.tensor(list(ranks), device=ids.device))  # (R,)
    return (ids.unsqueeze(1) == col_owner).to(col_scale.dtype) * col_scale  # (N, R); rows with id -1 all zero


def stacked_lora(x: Tensor, a_cat: Tensor, b_cat: Tensor, mask: Tensor) -> Tensor:
    """``delta`` (N, ..., out) = ((x A_cat^T) * M) B_cat^T for x (N, ..., in), mask M (N, R) (module docstring)."""
    h = x @ a_cat.t()  # (N, ..., R)
    h = h * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
    return h @ b_cat.t()  # (N, ..., out)


def segmented_lora_ref(x: Tensor, adapters: Sequence[LowRank], ids: Tensor, out_features: int) -> Tensor:
    """Reference: one row at a time, ``delta_i = s B (A x_i)`` with row i's own adapter."""
    rows = []
    for i, k in enumerate(ids.reshape(-1).tolist()):
        w = adapters[k] if k >= 0 else None
        if w is None:
            rows.append(x.new_zeros(*x.shape[1:-1], out_features))
        else:
            a, b, scale = w
            rows.append(torch.nn.functional.linear(torch.nn.functional.linear(x[i], a), b) * scale)
    return torch.stack(rows) if rows else x.new_zeros(0, *x.shape[1:-1], out_features)
