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

:func:`batched_lora` is the second fast form, for decoding a sorted batch (the Punica BGMV idea on dense
tensors): the plan (:func:`plan_batches`, once per forward) lays the rows out as K segments padded
to the longest one, L rows each, and each layer does two batched matmuls on adapter-stacked
weights (``A_stack`` (K, in, r), ``B_stack`` (K, r, out) with the scale folded in and ranks
zero-padded to the largest)::

    delta[rows of k] = (x[rows of k] A_k^T) (s_k B_k)^T       for all k in one bmm pair

so each row does only its own adapter's arithmetic (a K-th of the stacked form's) in two ops.
Already-sorted rows in equal segments (the scheduler's expert-grouped batches) need no gather or
scatter at all; otherwise one gather and one scatter, and padding rows read an exact zero row.

Rows are the first axis of ``x``; anything between (time) rides along: ``x`` (N, ..., in).
Glossary: N rows, K adapters, r_k rank of adapter k, s_k = alpha_k / r_k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["SegmentPlan", "plan_segments", "segmented_lora", "segmented_lora_ref",
           "BatchPlan", "plan_batches", "gather_rows", "batched_lora", "stack_adapters"]

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


@dataclass(frozen=True)
class BatchPlan:
    """Rows laid out as K padded segments of L rows for :func:`batched_lora`.

    ``gather`` (K * L,) picks each slot's row of ``x`` (index N = an appended zero row for padding);
    ``scatter`` (N,) picks each row's slot of the flat result (index K * L = an appended zero row,
    for rows with no adapter). Both None: x already is K equal sorted segments and every row has one.
    """

    gather: Tensor | None
    scatter: Tensor | None
    n_adapters: int
    length: int
    n_rows: int
    padded: bool = False  # some slot is padding (gather holds index N)
    unassigned: bool = False  # some row has no adapter (scatter holds index K * L)


def plan_batches(ids: Tensor, n_adapters: int) -> BatchPlan:
    """The padded layout of rows with adapter ids ``ids`` (N,) in ``[-1, n_adapters)`` (built once per forward)."""
    ids = ids.reshape(-1).long().cpu()
    n = ids.numel()
    if n and (int(ids.min()) < -1 or int(ids.max()) >= n_adapters):
        raise ValueError(f"adapter ids must be in [-1, {n_adapters}), got {sorted(set(ids.tolist()))[:8]}")
    counts = torch.bincount(ids[ids >= 0], minlength=n_adapters).tolist()
    length = max(counts) if counts else 0
    if n and n_adapters and all(c == length for c in counts) and bool((ids[1:] >= ids[:-1]).all()) and int(ids[0]) >= 0:
        return BatchPlan(None, None, n_adapters, length, n)
    gather = torch.full((n_adapters, max(length, 1)), n, dtype=torch.long)
    scatter = torch.full((n,), n_adapters * max(length, 1), dtype=torch.long)
    fill = [0] * n_adapters
    for i, k in enumerate(ids.tolist()):
        if k >= 0:
            gather[k, fill[k]] = i
            scatter[i] = k * max(length, 1) + fill[k]
            fill[k] += 1
    return BatchPlan(gather.reshape(-1), scatter, n_adapters, max(length, 1), n, padded=bool((gather == n).any()),
                     unassigned=bool((ids < 0).any()))


def stack_adapters(adapters: Sequence[LowRank], in_features: int, out_features: int,
                   like: Tensor) -> tuple[Tensor, Tensor]:
    """``A_stack`` (K, in, r_max) and ``B_stack`` (K, r_max, out) with each scale folded into B; an absent
    adapter (None) and the padding past each rank are zeros, so they add exact zeros."""
    r_max = max([w[0].shape[0] for w in adapters if w is not None] or [1])
    a_stack = like.new_zeros(len(adapters), in_features, r_max)
    b_stack = like.new_zeros(len(adapters), r_max, out_features)
    for k, w in enumerate(adapters):
        if w is not None:
            a, b, scale = w
            a_stack[k, :, : a.shape[0]] = a.t()
            b_stack[k, : a.shape[0]] = b.t() * scale
    return a_stack, b_stack


def gather_rows(x: Tensor, plan: BatchPlan) -> Tensor:
    """``x`` (N, ..., in) laid out as the plan's K * L slots (x itself when no gather is needed)."""
    if x.shape[0] != plan.n_rows:
        raise ValueError(f"batched_lora: the plan is for {plan.n_rows} rows, x has {x.shape[0]}")
    if plan.gather is None:
        return x
    src = torch.cat([x, x.new_zeros(1, *x.shape[1:])]) if plan.padded else x  # a zero row only for padding
    return src.index_select(0, plan.gather.to(x.device))


def batched_lora(x: Tensor, a_stack: Tensor, b_stack: Tensor, plan: BatchPlan, *, xs: Tensor | None = None,
                 base: Tensor | None = None) -> Tensor:
    """``delta`` (N, ..., out) for rows ``x`` (N, ..., in) in their original order (see the module docstring);
    with ``base`` (N, ..., out), ``base + delta`` (one fused ``baddbmm`` when no scatter is needed).

    ``xs``: :func:`gather_rows` of ``x`` when the caller already has it (layers that share an input)."""
    xs = gather_rows(x, plan) if xs is None else xs
    k, length, inner = plan.n_adapters, plan.length, x.shape[1:-1]
    h = torch.bmm(xs.reshape(k, -1, x.shape[-1]), a_stack)  # (K, L * T, r)
    if plan.scatter is None and base is not None:
        return torch.baddbmm(base.reshape(k, -1, b_stack.shape[-1]), h, b_stack).reshape(base.shape)
    out = torch.bmm(h, b_stack).reshape(k * length, *inner, b_stack.shape[-1])  # (K * L, ..., out)
    if plan.scatter is None:
        return out
    if plan.unassigned:  # rows without an adapter read an appended zero row
        out = torch.cat([out, out.new_zeros(1, *out.shape[1:])])
    delta = out.index_select(0, plan.scatter.to(x.device))
    return delta if base is None else base + delta


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
