"""Admission by work: estimate what a request costs, measure how fast work gets done, refuse early.

Symbols:

- ``cost`` of a request: ``sum over its rows of (prompt tokens + max_tokens)`` work tokens, i.e.
  ``n x (prompt + max_tokens)`` per prompt (each of the ``n`` rows prefills its prompt and may
  decode up to ``max_tokens``);
- ``backlog`` B: work tokens admitted and not yet done (the scheduler subtracts each row's
  prefilled prompt and every generated token, and releases the rest when the row ends);
- ``rate`` r: measured work tokens per second while the scheduler is busy, an exponentially
  weighted moving average over time, ``r <- r + (1 - exp(-dt / tau)) (x - r)`` for a step that did
  ``x = tokens / dt`` in ``dt`` seconds (``tau`` = :data:`RATE_TAU_S`);
- the allowance A: ``min(token_budget, r x admit_fraction x generation_timeout_s)``; before any
  rate is measured, one batch of default requests, ``min(token_budget, max_batch x
  default_max_tokens)`` (the first step measures the rate). The rate grows with the batch, so A
  grows as admitted work fills the batch: the rule follows what the server really does.

A request is admitted when ``cost <= max_request_share x token_budget`` (else refused: it would
never fit a fair share, so retrying does not help and no ``Retry-After`` is sent) and either the
server is idle or ``B + cost <= A``. Otherwise it is refused at once, before any work, with
``Retry-After = ceil((B + cost - A) / r)``: the seconds until enough of the backlog drains. So an
overload burst is answered 200 or 429, and what is admitted is expected to finish well inside the
timeout (``admit_fraction`` leaves the margin for a rate that drops).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

from taskmoe.errors import RequestError
from taskmoe.serving.limits import Limits

__all__ = ["Admission", "Refused", "RATE_TAU_S", "request_cost"]

RATE_TAU_S = 2.0
MAX_RETRY_AFTER_S = 3600


class Refused(RequestError):
    """A request refused before any work (answered 429; ``retry_after`` None: do not retry as is)."""

    def __init__(self, message: str, *, code: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


def request_cost(prompt_lengths: Sequence[int], n: int, max_tokens: int) -> int:
    """Work tokens of a request: ``n x (prompt + max_tokens)`` summed over its prompts."""
    return sum(n * (p + max_tokens) for p in prompt_lengths)


@dataclass
class Admission:
    """The admission rule and the measured rate (see the module docstring). Thread-safe."""

    limits: Limits
    rate: float | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def cap(self) -> int:
        """Most work tokens one request may ask for."""
        return max(1, int(self.limits.max_request_share * self.limits.token_budget))

    def allowance(self) -> float:
        """A: the backlog the server may hold now."""
        lim = self.limits
        if self.rate is None:
            return float(min(lim.token_budget, lim.max_batch * lim.default_max_tokens))
        return min(float(lim.token_budget), self.rate * lim.admit_fraction * lim.generation_timeout_s)

    def check(self, cost: int, backlog: int) -> None:
        """Raise :class:`Refused` unless a request of ``cost`` work tokens may start now."""
        if cost > self.cap:
            raise Refused(
                f"request asks for {cost} work tokens (n x (prompt tokens + max_tokens)), more than one request's "
                f"share of the server ({self.cap} = {self.limits.max_request_share:g} x token budget "
                f"{self.limits.token_budget}); lower n, max_tokens or the number of prompts",
                code="request_over_share", retry_after=None)
        allowed = self.allowance()
        if backlog == 0 or backlog + cost <= allowed:
            return
        if self.rate is None:
            wait = self.limits.retry_after_s
        else:
            wait = math.ceil((backlog + cost - allowed) / max(self.rate, 1e-9))
        wait = int(min(max(wait, 1), MAX_RETRY_AFTER_S))
        raise Refused(f"server busy: {backlog} work tokens queued or running, this request needs {cost} and the "
                      f"server takes {int(allowed)} now; retry after {wait} s", code="server_busy", retry_after=wait)

    def observe(self, tokens: int, seconds: float) -> None:
        """Fold one busy interval (``tokens`` work tokens done in ``seconds``) into the rate."""
        if seconds <= 0 or tokens <= 0:
            return
        x = tokens / seconds
        with self._lock:
            if self.rate is None:
                self.rate = x
            else:
                self.rate += (1.0 - math.exp(-seconds / RATE_TAU_S)) * (x - self.rate)
