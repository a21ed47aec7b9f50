"""Pure next-token selection functions over a batch of logits ``(B, V)``.

Order used by :func:`sample` (and by :mod:`taskmoe.inference.generate`)::

    logits -> repetition penalty -> / temperature -> top-k -> top-p (nucleus) -> draw

- Repetition penalty (CTRL, Keskar et al. 2019): for every token already seen in the row,
  ``l -> l / r`` if ``l > 0`` else ``l * r`` (``r > 1`` discourages repeats, ``r = 1`` is a no-op).
- Temperature: ``l -> l / T``; ``T = 0`` means greedy (argmax, ties to the lowest id).
- Top-k: keep exactly the k largest logits per row (others -> -inf); ``k = 0`` keeps all.
- Top-p: keep the smallest prefix of tokens, by descending probability, whose mass reaches p
  (a token is kept if the mass *before* it is < p, so the most likely token always survives).
- Draw: ``torch.multinomial`` with an explicit ``torch.Generator`` -> reproducible given a seed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def greedy(logits: Tensor) -> Tensor:
    """argmax per row -> (B,) int64."""
    return logits.argmax(dim=-1)


def seen_mask(rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) bool: True where the row's tokens contain that id."""
    mask = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        if len(row):
            mask[i, torch.as_tensor(list(row), dtype=torch.long, device=device)] = True
    return mask


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL penalty on tokens where ``seen`` (B, V) is True: positive / r, negative * r."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits (use greedy for 0), got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (exactly k, ties broken by position); 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    vals, idx = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, vals)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep tokens while the probability mass before them is < p.

    The most likely token is always kept, so even a p that rounds to 0 leaves a valid draw.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop = before >= p
    drop[..., 0] = False  # (B, V) sorted: never drop the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row -> (B,) int64; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return greedy(logits)
    # shift by the row max first: softmax is unchanged, and a tiny temperature cannot overflow to inf
    logits = logits.float()
    logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
