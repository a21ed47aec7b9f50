"""The cross-talk interrupt policy of the IMoE seed: when may one expert interrupt another?

The seed's formula, with the squash it writes as "epsilon"::

    P_interrupt = squash( (C^2 * C^alpha * log(T_since)) / (I_recent * beta) - shr )

Glossary (seed symbol -> argument):

=========  ==============  ==============================================================
symbol     argument        meaning
=========  ==============  ==============================================================
C          ``confidence``  the interrupting expert's router confidence, in [0, 1]
alpha      ``alpha``       confidence scaling exponent (>= 0); C^2 * C^alpha = C^(2+alpha)
T_since    ``t_since``     turns since this expert last interrupted (>= 1, see below)
I_recent   ``i_recent``    this expert's consecutive interruptions so far (>= 0)
beta       ``beta``        penalty scale (> 0)
shr        ``shr``         shift applied before the squash
epsilon    ``squash``      maps the score to a probability; logistic sigmoid by default
=========  ==============  ==============================================================

Edge cases the seed leaves open, and what we do:

- **I_recent = 0** (the expert has not interrupted in a row): the denominator would be 0. We
  use ``max(I_recent, 1)``, so the formula is the seed's wherever it is defined and a first
  interruption is judged like a lone one. Consecutive interruptions (2, 3, ...) then divide the
  score down, as the seed intends.
- **T_since = 1**: ``log(1) = 0``, so the score is ``-shr`` and P = squash(-shr): right after
  its last turn an expert only interrupts at the base rate set by ``shr``.
- **T_since < 1** is rejected: turns are counted from 1 (the turn right after an interruption).
  An expert that never interrupted uses the number of turns since the dialogue began plus one.

State is explicit: :class:`InterruptState` holds (T_since, I_recent) and :meth:`~InterruptState.after`
returns the next state; nothing here keeps hidden counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from taskmoe.config import Config, check_choice, check_min, doc

SquashName = Literal["sigmoid", "tanh", "clip"]


def _sigmoid(x: float) -> float:
    # numerically safe logistic
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


SQUASHES: dict[str, Callable[[float], float]] = {
    "sigmoid": _sigmoid,  # 1 / (1 + e^-x)
    "tanh": lambda x: 0.5 * (math.tanh(x) + 1.0),  # (tanh(x) + 1) / 2, same midpoint, steeper
    "clip": lambda x: min(1.0, max(0.0, x)),  # the raw score clipped to [0, 1]
}


@dataclass
class InterruptConfig(Config):
    """Constants of the interrupt probability (seed names in brackets)."""

    alpha: float = doc(1.0, "[alpha] confidence scaling exponent, >= 0")
    beta: float = doc(1.0, "[beta] penalty scale for consecutive interruptions, > 0")
    shr: float = doc(2.0, "[shr] shift subtracted before the squash; P at T_since=1 is squash(-shr)")
    squash: str = doc("sigmoid", "[epsilon] squash: sigmoid | tanh | clip")

    def validate(self) -> None:
        check_min(self, ("alpha",))
        check_min(self, ("beta",), strict=True)
        check_choice(self, "squash", sorted(SQUASHES))


def interrupt_score(confidence: float, t_since: float, i_recent: int, *, alpha: float, beta: float, shr: float) -> float:
    """The pre-squash score ``(C^2 * C^alpha * log(T_since)) / (max(I_recent, 1) * beta) - shr``."""
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence C must be in [0, 1], got {confidence}")
    if t_since < 1:
        raise ValueError(f"T_since counts turns from 1, got {t_since}")
    if i_recent < 0:
        raise ValueError(f"I_recent must be >= 0, got {i_recent}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    numerator = confidence**2 * confidence**alpha * math.log(t_since)
    return numerator / (max(i_recent, 1) * beta) - shr


def interrupt_probability(confidence: float, t_since: float, i_recent: int, cfg: InterruptConfig | None = None) -> float:
    """``P_interrupt = squash((C^2 * C^alpha * log(T_since)) / (max(I_recent, 1) * beta) - shr)``.

    >>> round(interrupt_probability(1.0, 1, 0), 6)   # log(1) = 0 -> sigmoid(-2)
    0.119203
    """
    cfg = cfg or InterruptConfig()
    s = interrupt_score(confidence, t_since, i_recent, alpha=cfg.alpha, beta=cfg.beta, shr=cfg.shr)
    return SQUASHES[cfg.squash](s)


def sample_interrupt(p: float, generator: torch.Generator) -> bool:
    """One Bernoulli(p) draw from a seeded generator (reproducible interruptions)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {p}")
    return bool(torch.bernoulli(torch.tensor(p, dtype=torch.float64), generator=generator).item())


@dataclass(frozen=True)
class InterruptState:
    """One expert's interrupt history: turns since its last interruption and its run length."""

    t_since: int = 1
    i_recent: int = 0

    def after(self, interrupted: bool) -> "InterruptState":
        """State after a turn: an interruption resets T_since to 1 and extends the run; a turn
        without one ages T_since and ends the run."""
        if interrupted:
            return InterruptState(t_since=1, i_recent=self.i_recent + 1)
        return InterruptState(t_since=self.t_since + 1, i_recent=0)

    def aged(self) -> "InterruptState":
        """State after a turn in which this expert was *speaking* (so it had no chance to interrupt):
        T_since ages, and the run of consecutive interruptions is kept (only declining a chance to
        interrupt ends it). Used by :mod:`taskmoe.crosstalk.dialogue` for the current speaker."""
        return InterruptState(t_since=self.t_since + 1, i_recent=self.i_recent)
