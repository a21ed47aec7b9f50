"""Admission by work: predict what a request costs in seconds, refuse early what would not finish in time.

The seconds come from :class:`~taskmoe.serving.costs.CostModel` (separately measured prefill
seconds per prompt token and decode rounds ``t = a x batches + b x rows``; see there). Symbols:

- ``cost`` of a request in **work tokens**: ``n x (prompt + max_tokens)`` per prompt (each of the
  ``n`` rows prefills its prompt and may decode up to ``max_tokens``); ``backlog`` B: work tokens
  admitted and not yet done (the token budget and the per-request share are counted in these);
- ``T``: the predicted seconds until the backlog **plus the request** is done
  (:meth:`CostModel.predict` over every live row and the request's rows, each decoding up to its
  ``max_tokens``, a live row at most until its deadline);
- ``F = admit_fraction x generation_timeout_s``: the share of the timeout admitted work must fit
  in (the rest is the margin for a machine that slows down).

A request is refused, at once and before any work (429), when

1. ``cost > max_request_share x token_budget``: it never fits one request's share, retrying as is
   does not help, so no ``Retry-After`` (code ``request_over_share``);
2. otherwise, an idle server (no live row) admits it (``max_tokens`` is an upper bound; the deadline
   halts a row that runs over);
3. ``B + cost > token_budget``: ``Retry-After = ceil(T_B x (B + cost - token_budget) / B)``, the
   seconds the predicted pace ``T_B`` (the backlog alone) takes to drain the excess;
4. before a decode round was timed: ``B + cost`` over one batch of default requests
   (``min(token_budget, max_batch x default_max_tokens)``), ``Retry-After = retry_after_s`` (the
   first round measures the rates);
5. ``T > F``: ``Retry-After = ceil(T - F)``, the seconds until enough of the backlog is done that
   the request would fit (the backlog drains at the predicted pace).

Codes 2-5 are ``server_busy``. So an overload burst is answered 200 or 429, and what is admitted is
predicted to finish within ``F`` even if every admitted row decodes its full ``max_tokens``.
``throughput`` (work tokens per busy second, an EWMA over time with ``tau`` = :data:`RATE_TAU_S`)
is reported in ``/health`` and ``/metrics``; admission does not use it (a prefill makes it spike).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

from taskmoe.errors import RequestError
from taskmoe.serving.costs import CostModel, RowWork
from taskmoe.serving.limits import Limits

__all__ = ["Admission", "Refused", "RATE_TAU_S", "RowWork", "request_cost"]

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
    """The admission rule (see the module docstring) over a :class:`CostModel`. Thread-safe."""

    limits: Limits
    throughput: float | None = None
    costs: CostModel = field(init=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.costs = CostModel(self.limits.max_batch)

    @property
    def cap(self) -> int:
        """Most work tokens one request may ask for."""
        return max(1, int(self.limits.max_request_share * self.limits.token_budget))

    @property
    def horizon_s(self) -> float:
        """``F``: the seconds admitted work must be predicted to finish in."""
        return self.limits.admit_fraction * self.limits.generation_timeout_s

    def check(self, cost: int, backlog: int, live: Sequence[RowWork], request: Sequence[RowWork]) -> None:
        """Raise :class:`Refused` unless a request (``cost`` work tokens, rows ``request``) may start now.

        ``backlog``: work tokens of the ``live`` rows (admitted, not ended) not yet done."""
        lim = self.limits
        if cost > self.cap:
            raise Refused(
                f"request asks for {cost} work tokens (n x (prompt tokens + max_tokens)), more than one request's "
                f"share of the server ({self.cap} = {lim.max_request_share:g} x token budget "
                f"{lim.token_budget}); lower n, max_tokens or the number of prompts",
                code="request_over_share", retry_after=None)
        if not live:
            return
        measured = self.costs.measured
        if backlog + cost > lim.token_budget:
            wait = (math.ceil(self.costs.predict(live) * (backlog + cost - lim.token_budget) / max(backlog, 1))
                    if measured else lim.retry_after_s)
            _busy(f"{backlog} work tokens queued or running, this request needs {cost} and the token budget is "
                  f"{lim.token_budget}", wait)
        if not measured:
            first = min(lim.token_budget, lim.max_batch * lim.default_max_tokens)
            if backlog + cost > first:
                _busy(f"{backlog} work tokens queued or running, this request needs {cost}, and until the first "
                      f"decode step is timed the server takes one batch ({first})", lim.retry_after_s)
            return
        t = self.costs.predict([*live, *request])
        if t > self.horizon_s:
            _busy(f"the {len(live)} rows queued or running and this request's {len(request)} are predicted to take "
                  f"{t:.1f} s, more than {self.horizon_s:g} s (admit_fraction {lim.admit_fraction:g} x timeout "
                  f"{lim.generation_timeout_s:g} s)", math.ceil(t - self.horizon_s))

    def observe(self, tokens: int, seconds: float) -> None:
        """Fold one busy interval (``tokens`` work tokens done in ``seconds``) into ``throughput``."""
        if seconds <= 0 or tokens <= 0:
            return
        x = tokens / seconds
        with self._lock:
            if self.throughput is None:
                self.throughput = x
            else:
                self.throughput += (1.0 - math.exp(-seconds / RATE_TAU_S)) * (x - self.throughput)


def _busy(why: str, wait: float) -> None:
    wait = int(min(max(wait, 1), MAX_RETRY_AFTER_S))
    raise Refused(f"server busy: {why}; retry after {wait} s", code="server_busy", retry_after=wait)
