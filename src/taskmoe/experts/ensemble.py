"""Confidence-weighted ensembles of experts (as in c-BTM), usable without the summarizer.

The next-token distribution of the ensemble is the mixture ``p(x) = sum_e w_e * p_e(x)`` with
``w_e`` the router's confidences for the selected experts, renormalised to sum to 1. It is
computed in log space, ``log p = logsumexp_e(log w_e + log_softmax(logits_e))``, so tiny
probabilities do not underflow.
"""

from __future__ import annotations

import torch

from taskmoe.errors import ConfigError


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
