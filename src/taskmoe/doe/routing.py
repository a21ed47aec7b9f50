"""Per-sequence routing: the decision rule, the ``Routing`` record and its dispatch plan.

A DOE model routes whole *sequences*, once, from the prompt. This module holds the pure math of
that decision and the object that carries it to every MoE layer and every decode step.

Glossary (seed: "each expert would be associated with a set of gating weights which would decide
whether or not the expert should process the input"):

- ``h``      (B, D)  pooled sequence representation (mean over prompt tokens only)
- ``p``      (B, E)  gate scores ``p[b, e] = sigmoid(w_e . norm(h_b) + b_e)``
- ``tau``            acceptance threshold: expert ``e`` accepts sequence ``b`` iff ``p[b, e] > tau``
- ``C``              training capacity ``ceil(capacity_factor * K * B / E)``: expert ``e`` takes at
                     most ``C`` sequences of the batch, chosen by score (:func:`balanced_assignment`),
                     and every sequence gets an expert (``K`` when room allows), so the load is
                     balanced by construction.
                     Plain expert choice (each expert its top-``C``) was tried first: experts pick
                     overlapping favourites, and the top-``K`` cut plus the default then sent up to
                     75% of a batch to one expert
- ``K``              ``max_experts``: at most the ``K`` best-scoring accepted experts serve a sequence
- ``w``      (B, K)  combine weights ``w_k = p_k / sum_j p_j`` over the sequence's experts

Design choices:

- **Default for a sequence no expert accepts: the best-scoring eligible expert** (weight 1). It
  adds no parameters, keeps every sequence served by a specialist, and is stable under extraction
  (the best of the kept experts is the best overall whenever it is kept). A shared expert would
  only see the few rejected sequences and stay undertrained. "Eligible" excludes experts added
  after training (:meth:`SequenceGate.add_expert` marks them so): a late specialist serves only the
  sequences its own gate accepts, which is what keeps every other output bit-identical when it
  is added.
- **Detached normaliser.** ``w_k = p_k / stop_grad(sum_j p_j)``: the forward value is the
  normalised score (exactly 1.0 for a single expert, since ``x / x == 1`` in IEEE arithmetic), and
  the LM loss still sends ``dL/dp_k = <dL/dy, f_k(x)> / sum_j p_j`` to each gate, which a fully
  normalised single-expert weight (constant 1) would not.
- **The plan is computed once.** :class:`DispatchPlan` (rows sorted by expert, split sizes as
  Python ints, whether the batch is expert-grouped) is built on first use and cached on the
  ``Routing``; every layer and every decode step reuses it, so a decode step neither routes nor
  sorts. A batch whose rows all chose the same expert set is *grouped*: layers then run the
  experts on the batch as is, with no gather or scatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from taskmoe.errors import ConfigError


# ------------------------------------------------------------------------------ pure math
def pool_prompt(h: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
    """Mean of ``h`` (B, T, D) over the prompt positions: ``sum_t m_bt h_bt / max(1, sum_t m_bt)``.

    ``prompt_mask`` (B, T) bool marks prompt tokens (None: every position is prompt). Tokens
    generated later are never in the mask, so they cannot change the routing.
    """
    if prompt_mask is None:
        return h.mean(dim=1)
    if prompt_mask.shape != h.shape[:2]:
        raise ValueError(f"pool_prompt: prompt_mask shape {tuple(prompt_mask.shape)} != (B, T) {tuple(h.shape[:2])}")
    m = prompt_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def balanced_assignment(scores: Tensor, capacity: int, k: int = 1) -> Tensor:
    """Capacity-constrained assignment (B, E) bool: each row gets up to ``k`` experts, each expert at most ``capacity`` rows.

    Rounds of proposals (at most ``E + k`` rounds, each vectorised over the batch): every row
    that still needs an expert proposes to its best-scoring expert that has room and has not
    taken it yet; every expert accepts its best-scoring proposals up to its remaining room. A
    rejection only happens when an expert fills up, so for ``k = 1`` and ``capacity * E >= B``
    every row ends with exactly one expert (for ``k > 1`` a row can end with fewer when the only
    room left is at experts it already has). Higher scores win on both sides: experts choose among the
    sequences that want them (the seed's "each expert would choose the type of input it wants
    to process") while no sequence is left without an expert and none is served twice.
    """
    B, E = scores.shape
    k = max(1, min(int(k), E))
    s = scores.detach()
    accepted = torch.zeros(B, E, dtype=torch.bool, device=s.device)
    room = torch.full((E,), int(capacity), dtype=torch.long, device=s.device)
    ranks = torch.arange(B, device=s.device).unsqueeze(1).expand(B, E)  # (B, E)
    for _ in range(E + k):
        need = accepted.sum(1) < k  # (B,)
        open_ = (room > 0).unsqueeze(0) & ~accepted & need.unsqueeze(1)  # (B, E)
        if not bool(open_.any()):
            break
        masked = s.masked_fill(~open_, float("-inf"))
        best, choice = masked.max(dim=1)  # (B,)
        proposing = torch.isfinite(best)
        prop = torch.zeros_like(accepted)
        prop[proposing, choice[proposing]] = True
        order = s.masked_fill(~prop, float("-inf")).argsort(dim=0, descending=True, stable=True)  # (B, E)
        rank = torch.empty_like(order).scatter_(0, order, ranks)  # rank of each row within its column
        take = prop & (rank < room.unsqueeze(0))
        accepted |= take
        room -= take.sum(0)
    return accepted


def capacity_for(batch_size: int, n_experts: int, capacity_factor: float, k: int = 1) -> int:
    """``C = ceil(capacity_factor * k * B / E)``, at least 1: the sequences each expert may take in training."""
    return max(1, math.ceil(capacity_factor * k * batch_size / n_experts - 1e-9))


def decide(
    scores: Tensor,
    accepted: Tensor,
    max_experts: int,
    eligible: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Turn gate scores and an acceptance mask into per-sequence experts and combine weights.

    Keeps the ``K = max_experts`` best-scoring accepted experts of each row; a row with none gets
    the best-scoring expert among ``eligible`` (E,) bool. Returns ``ids`` (B, K) int64 (``-1`` =
    empty slot), ``weights`` (B, K) with ``w_k = p_k / stop_grad(sum_j p_j)`` (0 on empty slots),
    and ``fallback`` (B,) bool (rows that went to the default expert).
    """
    B, E = scores.shape
    K = max(1, min(int(max_experts), E))
    masked = scores.detach().masked_fill(~accepted, float("-inf"))
    top_val, top_idx = masked.topk(K, dim=1)  # (B, K), best first
    valid = torch.isfinite(top_val)
    fallback = ~valid[:, 0]
    if not bool(eligible.any()):
        eligible = torch.ones_like(eligible)
    best = scores.detach().masked_fill(~eligible.unsqueeze(0), float("-inf")).argmax(dim=1)  # (B,)
    top_idx[:, 0] = torch.where(fallback, best, top_idx[:, 0])
    valid[:, 0] = True
    ids = torch.where(valid, top_idx, torch.full_like(top_idx, -1))
    p = scores.gather(1, top_idx) * valid  # (B, K)
    weights = p / p.detach().sum(dim=1, keepdim=True)
    return ids, weights, fallback


# ------------------------------------------------------------------------------ records
@dataclass
class DispatchPlan:
    """How a batch's rows reach the experts, computed once per ``Routing``.

    ``rows`` (P,) are batch rows of the (row, expert) pairs sorted by expert; ``pair`` (P,) indexes
    the flattened (B, K) routing weights in the same order; ``splits`` are the pair counts per
    expert in ``names`` order. ``group`` (expert ids, ascending) is set when every row has the same
    expert set: the layer then runs those experts on the whole batch (no gather/scatter), and
    ``slot`` (B, G) says in which of its K slots each row holds ``group[j]`` (its weight's column).
    ``unit`` means all weights are exactly 1 and need no multiply.
    """

    rows: Tensor
    pair: Tensor
    splits: list[int]
    group: tuple[int, ...] | None
    unit: bool
    slot: Tensor | None = None


@dataclass
class Routing:
    """One routing decision per sequence, reused by every MoE layer and every decode step.

    ``names`` is the expert order the ids refer to; ``ids`` (B, K) expert indices (``-1`` empty),
    ``weights`` (B, K) combine weights, ``scores`` (B, E) gate probabilities, ``accepted`` (B, E)
    the threshold or capacity decision before the default, ``fallback`` (B,) rows that got the
    default expert.
    """

    names: tuple[str, ...]
    ids: Tensor
    weights: Tensor
    scores: Tensor
    accepted: Tensor
    fallback: Tensor
    _plan: DispatchPlan | None = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def plan(self) -> DispatchPlan:
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _make_plan(self) -> DispatchPlan:
        B, K = self.ids.shape
        E = len(self.names)
        flat = self.ids.reshape(-1)  # (B*K,)
        pair = torch.nonzero(flat >= 0).squeeze(1)  # (P,)
        e = flat.index_select(0, pair)
        e, order = torch.sort(e, stable=True)
        pair = pair.index_select(0, order)
        splits = torch.bincount(e, minlength=E).tolist()
        group, slot = None, None
        if B > 0:  # the same expert *set* on every row (slots may be in another order: scores differ)
            order = self.ids.masked_fill(self.ids < 0, E).sort(dim=1)  # (B, K) expert ids ascending, empties last
            if bool((order.values == order.values[:1]).all()):
                n = int((order.values[0] < E).sum())
                group, slot = tuple(int(i) for i in order.values[0, :n].tolist()), order.indices[:, :n]
        unit = bool((self.weights.detach()[self.ids >= 0] == 1).all())
        return DispatchPlan(rows=torch.div(pair, K, rounding_mode="floor"), pair=pair, splits=splits,
                            group=group, unit=unit, slot=slot)

    def expert_names(self) -> list[tuple[str, ...]]:
        """Per row, the names of the experts that serve it (best first)."""
        return [tuple(self.names[i] for i in row if i >= 0) for row in self.ids.tolist()]

    def top1(self) -> Tensor:
        """(B,) index of each row's best expert (for reports and grouping)."""
        return self.ids[:, 0]

    def groups(self) -> dict[tuple[int, ...], Tensor]:
        """Rows keyed by their expert set: what an expert-grouped scheduler batches together."""
        out: dict[tuple[int, ...], list[int]] = {}
        for b, row in enumerate(self.ids.tolist()):
            out.setdefault(tuple(sorted(i for i in row if i >= 0)), []).append(b)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}

    # batch operations (the engine drops finished rows, regroups, merges prefills)
    def select(self, rows: Tensor) -> "Routing":
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.ids.device)
        return Routing(self.names, self.ids[rows], self.weights[rows], self.scores[rows], self.accepted[rows],
                       self.fallback[rows])

    @classmethod
    def cat(cls, routings: Sequence["Routing"]) -> "Routing":
        names = routings[0].names
        for r in routings[1:]:
            if r.names != names:
                raise ConfigError(f"Routing.cat: expert names differ ({list(names)} vs {list(r.names)})")
        K = max(r.ids.shape[1] for r in routings)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, K - t.shape[1]), value=v)  # noqa: E731
        return cls(names, torch.cat([pad(r.ids, -1) for r in routings]), torch.cat([pad(r.weights, 0.0) for r in routings]),
                   torch.cat([r.scores for r in routings]), torch.cat([r.accepted for r in routings]),
                   torch.cat([r.fallback for r in routings]))

    def clone(self) -> "Routing":
        return Routing(self.names, self.ids.clone(), self.weights.clone(), self.scores.clone(), self.accepted.clone(),
                       self.fallback.clone())

    def detach(self) -> "Routing":
        return Routing(self.names, self.ids, self.weights.detach(), self.scores.detach(), self.accepted,
                       self.fallback, self._plan)


# ------------------------------------------------------------------------------ gate loss
def gate_loss(routing: Routing, labels: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of the gate scores against a per-(sequence, expert) target.

    ``L = mean_{b,e} BCE(p[b, e], y[b, e])``. Without labels (``gate_supervision = none``) the
    target is the routing's own acceptance (capacity assignment in training), which teaches the
    gates that ``p > tau`` reproduces the balanced training assignment at inference. With
    ``labels`` (B,) int64 expert indices (``gate_supervision = router``; ``-1`` = unlabelled row,
    ignored) the target is the one-hot label. Computed in float32 from the probabilities, clamped
    away from 0 and 1.
    """
    p = routing.scores.float().clamp(1e-6, 1 - 1e-6)
    if labels is None:
        target = routing.accepted.float()
        return torch.nn.functional.binary_cross_entropy(p, target)
    labels = labels.to(device=p.device, dtype=torch.long)
    if labels.shape != p.shape[:1]:
        raise ValueError(f"gate_loss: labels shape {tuple(labels.shape)} != (B,) = {tuple(p.shape[:1])}")
    E = p.shape[1]
    if bool((labels >= E).any()):
        raise ValueError(f"gate_loss: label {int(labels.max())} out of range for {E} experts")
    keep = labels >= 0
    if not bool(keep.any()):
        return p.sum() * 0.0
    target = torch.nn.functional.one_hot(labels[keep], E).float()
    return torch.nn.functional.binary_cross_entropy(p[keep], target)
