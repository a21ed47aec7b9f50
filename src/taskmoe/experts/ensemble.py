"""Confidence-weighted ensembles of experts (as in c-BTM), usable without the summarizer.

The next-token distribution of the ensemble is the mixture ``p(x) = sum_e w_e * p_e(x)`` with
``w_e`` the router's confidences for the selected experts, renormalised to sum to 1. It is
computed in log space, ``log p = logsumexp_e(log w_e + log_softmax(logits_e))``, so tiny
probabilities do not underflow.

- :func:`mixture_logprobs`: the formula over stacked logits of experts that all ran on the batch.
- :func:`routing_weights`: the ``(N, E)`` weight matrix from routing decisions, for three rules:
  ``"routed"`` (the IMoE policy: the selected experts with their renormalised confidences, every
  expert with the full confidence vector on a fallback), ``"top1"`` (the most confident expert
  alone) and ``"all"`` (every expert weighted by its confidence, the c-BTM ensemble).
- :class:`RoutedMixture`: the same mixture as a module over named experts where each expert runs
  only on the rows that give it weight (rows grouped by expert with index ops, one call per
  expert, never per row). Experts can be *pruned* (:meth:`RoutedMixture.prune`): their weight is
  dropped and the row renormalised; a row whose every weighted expert is pruned falls back to
  its confidences over the remaining experts (the policy's fallback), else to uniform.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from taskmoe.errors import ConfigError

ROUTING_MODES = ("routed", "top1", "all")


def mixture_logprobs(expert_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log sum_e w_e softmax(logits_e)`` over the expert axis.

    expert_logits: (E, ..., V); weights: (E,) or (E, B) broadcastable over the leading batch
    axis, non-negative, renormalised here. Returns (..., V) log-probabilities.
    """
    if expert_logits.shape[0] != weights.shape[0]:
        raise ConfigError(f"{expert_logits.shape[0]} experts' logits but {weights.shape[0]} weights")
    w = weights.float()
    if (w < 0).any():
        raise ConfigError("ensemble weights must be non-negative")
    w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
    logw = torch.log(w.clamp_min(1e-30))
    while logw.ndim < expert_logits.ndim:
        logw = logw.unsqueeze(-1)  # (E, ..., 1)
    return torch.logsumexp(logw + expert_logits.float().log_softmax(-1), dim=0)


def routing_weights(decisions: Sequence[Any], n_experts: int, mode: str = "routed") -> torch.Tensor:
    """``(N, E)`` mixing weights from routing decisions (each row sums to 1); see the module docstring.

    ``decisions[i]`` needs ``selected``, ``weights`` and ``confidences`` (a
    :class:`~taskmoe.router.policy.RoutingDecision`); column ``e`` is category ``e``.
    """
    if mode not in ROUTING_MODES:
        raise ConfigError(f"routing mode must be one of {ROUTING_MODES}, got {mode!r}")
    w = torch.zeros(len(decisions), n_experts, dtype=torch.float64)
    for i, d in enumerate(decisions):
        conf = torch.as_tensor(d.confidences, dtype=torch.float64)
        if conf.numel() != n_experts:
            raise ConfigError(f"decision {i} has {conf.numel()} confidences for {n_experts} experts")
        if mode == "routed":
            w[i, torch.as_tensor(list(d.selected), dtype=torch.long)] = torch.as_tensor(list(d.weights), dtype=torch.float64)
        elif mode == "top1":
            w[i, int(conf.argmax())] = 1.0
        else:
            w[i] = conf
    return (w / w.sum(1, keepdim=True).clamp_min(1e-12)).float()


class RoutedMixture(nn.Module):
    """Named experts mixed per sequence: ``log p(x_t) = log sum_e w_e p_e(x_t)``.

    ``forward(input_ids (B, T), weights (B, E), fallback (B, E) | None) -> (B, T, V)`` log-probs;
    column ``e`` of the weights belongs to ``names[e]``. Each expert's output is ``.logits`` of
    what it returns (a :class:`~taskmoe.models.model.LMOutput`) or the returned tensor itself.
    """

    def __init__(self, experts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not experts:
            raise ConfigError("RoutedMixture needs at least one expert")
        self.names = list(experts)
        self.experts = nn.ModuleDict(dict(experts))
        self.pruned: list[str] = []

    @property
    def active(self) -> list[str]:
        return [n for n in self.names if n not in self.pruned]

    def prune(self, names: Iterable[str]) -> None:
        """Remove experts from the mixture (their columns get weight 0 from now on)."""
        for n in names:
            if n not in self.names:
                raise ConfigError(f"cannot prune unknown expert {n!r}; experts: {self.names}")
            if n not in self.pruned:
                self.pruned.append(n)
        if not self.active:
            raise ConfigError("RoutedMixture: every expert is pruned")

    def effective_weights(self, weights: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
        """``weights (B, E)`` with pruned columns zeroed and rows renormalised (module docstring)."""
        if weights.dim() != 2 or weights.shape[1] != len(self.names):
            raise ConfigError(f"weights must be (batch, {len(self.names)}), got {tuple(weights.shape)}")
        keep = torch.tensor([n not in self.pruned for n in self.names], device=weights.device)  # (E,)
        w = weights.float().clamp_min(0) * keep
        empty = w.sum(1) <= 0  # (B,)
        if bool(empty.any()):
            fb = fallback.float().clamp_min(0) * keep if fallback is not None else torch.zeros_like(w)
            fb = torch.where(fb.sum(1, keepdim=True) > 0, fb, keep.float().expand_as(fb))
            w = torch.where(empty[:, None], fb, w)
        return w / w.sum(1, keepdim=True)

    def forward(self, input_ids: torch.Tensor, weights: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
        w = self.effective_weights(weights, fallback)  # (B, E)
        out: torch.Tensor | None = None
        for e, name in enumerate(self.names):
            rows = torch.nonzero(w[:, e] > 0).squeeze(1)  # (n_e,)
            if rows.numel() == 0:
                continue
            res = self.experts[name](input_ids.index_select(0, rows))
            lp = getattr(res, "logits", res).float().log_softmax(-1)  # (n_e, T, V)
            if out is None:
                out = torch.full((input_ids.shape[0], *lp.shape[1:]), float("-inf"), device=lp.device)  # (B, T, V)
            term = lp + w[rows, e].log()[:, None, None]
            out = out.index_put((rows,), torch.logaddexp(out.index_select(0, rows), term))
        assert out is not None  # every row has an expert with positive weight
        return out

    def contributions(self, weights: torch.Tensor, fallback: torch.Tensor | None = None) -> list[dict[str, float]]:
        """Per row, ``{expert: effective weight}`` for the experts that ran (for pruning trackers)."""
        w = self.effective_weights(weights, fallback).detach().cpu()
        return [{n: float(w[b, e]) for e, n in enumerate(self.names) if w[b, e] > 0} for b in range(w.shape[0])]
