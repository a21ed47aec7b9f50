"""Training losses as pure functions (no modules, no state): LM cross-entropy (also the SFT loss on
assistant-masked labels), sequence log-probabilities, DPO and its reward metrics, and the
switch-style load-balancing loss.

Conventions (shared by every recipe):

- ``logits`` are ``(B, T, V)`` and ``targets`` are ``(B, T)`` **aligned with the logits**:
  ``targets[b, t]`` is the token the model should predict at position ``t``. Shifting
  ``input_ids`` into next-token targets is done by the data layer, or by
  :func:`next_token_targets` when a batch holds only ``input_ids``.
- Positions to skip carry ``ignore_index`` (-100) in the targets, or 0 in an explicit mask.
- Reductions are computed in float32 whatever the logits' dtype (bf16 logits are upcast).

Glossary (DPO, Rafailov et al. 2023): ``pi`` policy, ``ref`` frozen reference, ``y_w`` chosen
answer, ``y_l`` rejected answer, ``beta`` the KL-strength temperature.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for next-token prediction: ``targets[:, t] = input_ids[:, t + 1]``, last = ignore.

    ``input_ids`` is ``(B, T)``; the result is ``(B, T)`` with ``ignore_index`` at ``t = T - 1``
    (nothing to predict after the last token).
    """
    targets = torch.full_like(input_ids, ignore_index)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean token-level cross-entropy over the positions whose target is not ``ignore_index``.

    ``L = -(1 / N) * sum_{(b,t): y_bt != ignore} log softmax(z_bt)[y_bt]`` with
    ``N = #{(b,t): y_bt != ignore}``. If every target is ignored the loss is 0 (not NaN) and
    still carries a gradient of zeros, so a fully-masked micro-batch cannot poison a step.

    Args:
        logits: ``(B, T, V)`` (any float dtype; computed in float32).
        targets: ``(B, T)`` int64, aligned with ``logits``.
    """
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V).float()  # (B*T, V)
    flat_targets = targets.reshape(-1)  # (B*T,)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count


def sequence_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the targets' log-probabilities over the masked positions of each sequence.

    ``log p(y_b | x_b) = sum_t m_bt * log softmax(z_bt)[y_bt]``, shape ``(B,)``. Targets at
    positions with ``m_bt = 0`` are never read (they may hold ``ignore_index``).

    Args:
        logits: ``(B, T, V)``; targets: ``(B, T)`` aligned with ``logits``;
        mask: ``(B, T)`` bool or float, 1 where the target counts (e.g. the answer tokens).
    """
    m = mask.to(torch.float32)  # (B, T)
    safe_targets = torch.where(m > 0, targets, torch.zeros_like(targets))  # (B, T)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * m).sum(dim=-1)  # (B,)


class DPOOutput(NamedTuple):
    """What :func:`dpo_loss` returns (unpacks as ``loss, chosen_rewards, rejected_rewards``)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Direct Preference Optimisation loss, mean over the batch.

    With the margin ``h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))``::

        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    (``eps = label_smoothing``; ``eps = 0`` is plain DPO, ``eps > 0`` the conservative variant
    for noisy preference labels). The implicit rewards are
    ``r_w = beta * (log pi(y_w) - log ref(y_w))`` and ``r_l = beta * (log pi(y_l) - log ref(y_l))``,
    returned detached (they are for logging: ``r_w > r_l`` means the pair is ranked right).

    All four inputs are ``(B,)`` sequence log-probabilities (see :func:`sequence_logprob`).
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = (policy_chosen_logp - policy_rejected_logp) - (ref_chosen_logp - ref_rejected_logp)  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen_logp - ref_chosen_logp).detach()
    rejected_rewards = beta * (policy_rejected_logp - ref_rejected_logp).detach()
    return DPOOutput(losses.mean(), chosen_rewards, rejected_rewards)


def completion_logprob(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``log pi(y | x)`` per row: :func:`sequence_logprob` over the positions whose label is not ignored.

    With the shifted, masked labels of :mod:`taskmoe.data.sft` (``-100`` except on the
    completion) this is the sum of the completion tokens' log-probabilities, ``(B,)``; it is the
    quantity TRL's DPO trainer sums (``per_token_logps`` under its ``completion_mask``).
    """
    return sequence_logprob(logits, labels, labels != ignore_index)


def dpo_metrics(out: DPOOutput) -> dict[str, torch.Tensor]:
    """Batch means of the implicit rewards ``r_w``, ``r_l``, the margin ``r_w - r_l`` and the
    accuracy ``[r_w > r_l]`` (the share of pairs the policy ranks right relative to the reference)."""
    margin = out.chosen_rewards - out.rejected_rewards
    return {
        "rewards_chosen": out.chosen_rewards.mean(),
        "rewards_rejected": out.rejected_rewards.mean(),
        "reward_margin": margin.mean(),
        "reward_accuracy": (margin > 0).float().mean(),
    }


def load_balance_loss(router_probs: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over ``N`` routed items and ``E`` experts.

    ``L = E * sum_e f_e * P_e`` where ``f_e`` is the fraction of assignments that went to
    expert ``e`` (not differentiable) and ``P_e = (1/N) sum_n p_ne`` is the mean router
    probability of ``e`` (differentiable). ``L = 1`` for a perfectly uniform router and grows to
    ``E`` when one expert takes everything with certainty. Items are tokens in a token-routed MoE
    and whole sequences in taskmoe's sequence-routed DOE layers.

    Args:
        router_probs: ``(N, E)`` routing probabilities (rows sum to 1).
        assignments: ``(N,)`` int expert index per item (top-1), or an ``(N, E)`` 0/1 mask
            (top-k: each item counts once for each expert it went to; ``f`` is normalised by
            the number of assignments so it still sums to 1).
    """
    N, E = router_probs.shape
    if assignments.dim() == 1:
        mask = F.one_hot(assignments.long(), num_classes=E).to(router_probs.dtype)  # (N, E)
    else:
        mask = assignments.to(router_probs.dtype)  # (N, E)
    mask = mask.detach()
    f = mask.sum(dim=0) / mask.sum().clamp(min=1)  # (E,)
    P = router_probs.mean(dim=0)  # (E,)
    return E * (f * P).sum()
