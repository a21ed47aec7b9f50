"""Token NLL: the one evaluation primitive every perplexity in taskmoe is computed with.

Glossary: ``z`` logits ``(B, T, V)``, ``y`` targets ``(B, T)`` aligned with the logits
(``y[b, t]`` is the token predicted at position ``t``), ``m`` the mask ``(B, T)`` of scored
positions (default ``y != -100``).

- :func:`row_nll` — per row ``nll_b = -sum_t m_bt log softmax(z_bt)[y_bt]`` and ``n_b = sum_t m_bt``
  (float64), from logits or from already-normalized log-probabilities; :func:`picked_nll` the same
  from the targets' own log-probabilities ``(B, T)``.
- :class:`NLL` — the running pair (sum of token NLL, token count) with ``mean = sum / count`` and
  ``ppl = exp(mean)``; pairs add, so a corpus is the sum of its batches (token-weighted, never a
  mean of batch means).
- :func:`corpus_nll` — :class:`NLL` over an iterable of batches: ``forward(batch)`` returns
  ``(z, y)`` or ``(z, y, m)``; runs under ``no_grad`` with the model in eval mode (restored after)
  and shows :func:`taskmoe.progress.progress_bar` when asked.
- :func:`perplexity` — ``exp(mean NLL)``, ``inf`` past float overflow instead of raising.
- :func:`batched` — consecutive collated batches of a map-style dataset (the usual ``batches``).

Design choice: reductions are float64 sums, so the result does not depend on how the tokens are
split into batches (up to float64 rounding), and a batch with no scored token adds ``(0, 0)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from taskmoe.progress import progress_bar

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "NLL", "row_nll", "corpus_nll", "perplexity", "evaluating", "batched", "picked_nll"]


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``; ``inf`` when it would overflow a float (mean NLL above ~709 nats)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def row_nll(z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, *, log_probs: bool = False,
            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed token NLL and scored-token counts, ``(B,)`` float64 each (module docstring).

    ``z`` is ``(B, T, V)`` logits (``log_probs=False``) or log-probabilities (``log_probs=True``:
    used as they are, e.g. a mixture's ``log sum_e w_e p_e``). ``mask`` defaults to ``y != ignore_index``;
    positions outside the mask may hold any target id.
    """
    m = (y != ignore_index) if mask is None else mask.bool() & (y != ignore_index)
    logp = z.float() if log_probs else z.float().log_softmax(-1)  # (B, T, V)
    picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T) log p(y_bt)
    return picked_nll(picked, m)


def picked_nll(logp_y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``-sum_t m_bt logp_y[b, t]`` and ``sum_t m_bt`` (float64) from the targets' own
    log-probabilities ``logp_y`` ``(B, T)`` (what teacher-forced scorers return)."""
    m = mask.bool()
    return -(logp_y.double() * m).sum(-1), m.sum(-1).double()


@dataclass(frozen=True)
class NLL:
    """Sum of token NLL (nats) and the number of tokens it is summed over."""

    total: float = 0.0
    tokens: int = 0

    def __add__(self, other: "NLL") -> "NLL":
        return NLL(self.total + other.total, self.tokens + other.tokens)

    @property
    def mean(self) -> float:
        """Mean token NLL (``nan`` over zero tokens)."""
        return self.total / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        """``exp(mean)``: the perplexity of the scored tokens."""
        return perplexity(self.mean) if self.tokens else math.nan

    @classmethod
    def of_picked(cls, logp_y: torch.Tensor, mask: torch.Tensor) -> "NLL":
        """The NLL of targets whose log-probabilities are given (see :func:`picked_nll`)."""
        nll, n = picked_nll(logp_y.detach(), mask)
        return cls(float(nll.sum()), int(n.sum()))

    @classmethod
    def of(cls, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, *, log_probs: bool = False) -> "NLL":
        """The NLL of one batch (see :func:`row_nll`)."""
        nll, n = row_nll(z.detach(), y, mask, log_probs=log_probs)
        return cls(float(nll.sum()), int(n.sum()))


@contextlib.contextmanager
def evaluating(model: nn.Module | None) -> Iterator[None]:
    """``no_grad`` with ``model`` in eval mode; its previous mode is restored on exit."""
    was = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if model is not None:
            model.train(was)


def corpus_nll(forward: Callable[[Any], tuple[torch.Tensor, ...]], batches: Iterable[Any], *,
               model: nn.Module | None = None, log_probs: bool = False, progress: bool = False,
               total: int | None = None, label: str = "scoring") -> NLL:
    """:class:`NLL` summed over ``batches``; ``forward(batch) -> (z, y)`` or ``(z, y, mask)``.

    ``model`` (if given) is put in eval mode for the pass; ``total`` is the batch count the bar shows.
    """
    acc = NLL()
    with evaluating(model), progress_bar(progress) as bar:
        task = bar.add_task(label, total=total)
        for batch in batches:
            acc = acc + NLL.of(*forward(batch), log_probs=log_probs)
            bar.advance(task)
    return acc


def batched(items: Any, batch_size: int, collate: Callable[[list[Any]], Any]) -> Iterator[Any]:
    """``collate`` over consecutive slices of ``batch_size`` items of a map-style dataset, in order."""
    for s in range(0, len(items), batch_size):
        yield collate([items[i] for i in range(s, min(s + batch_size, len(items)))])
