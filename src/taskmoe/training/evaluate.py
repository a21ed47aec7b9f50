"""The loop's evaluation: :func:`evaluate`, the weighted mean of ``loss_fn`` over a fixed eval prefix.

Kept beside :mod:`taskmoe.training.loop` (which calls it every ``eval_every`` steps and at the
end) so the loop file holds only the training step. The perplexity it reports is the token NLL
of :mod:`taskmoe.eval.nll`: with a token-mean loss and ``metrics["tokens"]`` as the batch weight,
``eval_loss`` is the summed NLL over the prefix divided by its token count, and
``eval_ppl = exp(eval_loss)``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn

from taskmoe.eval.nll import perplexity
from taskmoe.training.config import TrainConfig
from taskmoe.training.sampler import resolve_collate

__all__ = ["evaluate", "to_device"]

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


def evaluate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    cfg: TrainConfig,
    acc: Any = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> dict[str, float]:
    """Weighted mean loss (and metrics) over a fixed, unshuffled prefix of ``data``.

    The prefix is the first ``cfg.eval_batches`` global batches of ``batch_size * world_size``
    samples; each process evaluates its ``batch_size`` slice of each and the weighted sums are
    all-reduced, so every rank gets the same numbers and W processes evaluate exactly the
    samples one process with ``batch_size * W`` does. Each batch weighs its ``metrics["tokens"]``
    (else its sample count): with a token-mean loss this is the token-level mean over the whole
    prefix (the token NLL of :mod:`taskmoe.eval.nll`: summed NLL / token count), and
    ``eval_ppl = exp(eval_loss)`` is the corpus perplexity.
    """
    collate = resolve_collate(data, None if hasattr(data, "collate") else collate_fn)
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    B, n = cfg.batch_size, len(data)
    G = B * world
    slices = [(i * G + rank * B, min(i * G + (rank + 1) * B, n)) for i in range(min(cfg.eval_batches, math.ceil(n / G)))]
    # a rank with no samples of its own still runs one batch with weight 0, so all ranks reduce the same keys
    mine = [(a, b, True) for a, b in slices if a < b] or [(0, min(B, n), False)]
    device = acc.device if acc is not None else next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (acc.autocast() if acc is not None else nullcontext()):
            for a, b, real in mine:
                batch = to_device(collate([data[j] for j in range(a, b)]), device)
                loss, metrics = loss_fn(model, batch)
                metrics = dict(metrics)
                weight = float(metrics.pop("tokens", b - a)) if real else 0.0
                for k, v in {"loss": loss, **metrics, "weight": 1.0}.items():
                    sums[k] = sums.get(k, 0.0) + weight * torch.as_tensor(v, dtype=torch.float64, device=device).detach()
    finally:
        model.train(was_training)
    keys = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    if world > 1:
        vec = acc.reduce(vec, reduction="sum")
    tot = dict(zip(keys, vec.tolist()))
    total_weight = tot.pop("weight")
    out = {f"eval_{k}": v / total_weight for k, v in tot.items()}
    out["eval_ppl"] = perplexity(out["eval_loss"])
    return out


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, dicts, lists of them) moved to ``device`` (accelerate's ``send_to_device``)."""
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)
