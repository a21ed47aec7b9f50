"""AdamW with decay / no-decay parameter groups, and the warmup + cosine learning-rate schedule.

Design choices:

- **Only trainable parameters** (``requires_grad=True``) reach the optimizer, so freezing a
  submodule (a shared embedding, a base model under LoRA) is just ``p.requires_grad_(False)``.
- **No weight decay on norms, biases and embeddings.** Decay pulls a tensor towards 0: right
  for weight matrices, wrong for gains (RMSNorm weights should stay near 1), biases, and
  embedding tables (rare tokens' rows would shrink every step they are not seen). Rule:
  a parameter is decayed iff it has >= 2 dims and is not the weight of an ``nn.Embedding``
  (a head tied to the embedding is the same Parameter, so it is not decayed either).
- **The schedule is a pure function** of the step (:func:`lr_factor`), wrapped in torch's
  ``LambdaLR`` whose state (``last_epoch``, ``base_lrs``) is plain JSON for checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from taskmoe.errors import ConfigError
from taskmoe.training.config import TrainConfig


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the update made after ``step`` completed updates (0-based).

    - warmup, ``s < W``: ``(s + 1) / W`` (linear; the first update already moves, the W-th
      reaches 1.0),
    - cosine, ``s >= W``: ``m + (1 - m) * (1 + cos(pi * p)) / 2`` with
      ``p = min(1, (s - W) / max(1, S - 1 - W))``, so the first post-warmup update uses the peak
      and the last one (``s = S - 1``) uses exactly ``m`` (``S = max_steps``, ``m = min_lr_ratio``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group (empty ones dropped)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and id(p) not in embedding_weights:
            decay.append(p)
        else:
            no_decay.append(p)
    if not decay and not no_decay:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with the groups of :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying :func:`lr_factor`; call ``.step()`` once per optimizer step."""

    def factor(step: int) -> float:  # a plain function, so LambdaLR.state_dict() stays JSON
        return lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
