"""Every limit the HTTP server enforces, in one place.

The constants at the top are the defaults; :class:`Limits` bundles them into one validated
config that :func:`taskmoe.serving.app.create_app` and the scheduler take, so tests and the CLI
can tighten any of them without touching code.

What each limit protects against:

- ``max_body_bytes``: a huge body (413) is refused before it is read into memory.
- ``max_prompt_tokens``: a prompt longer than this after tokenization (413) never reaches a model.
- ``max_max_tokens`` / ``max_n`` / ``max_stop`` / ``max_messages``: one request cannot ask for an
  unbounded amount of work. They are written into the request schema (``/openapi.json``), so a
  violation is a 422 like any schema error. A completions request holds at most ``max_n`` prompts
  of ``max_n`` choices each, so ``max_n ** 2 <= queue_size``.
- ``token_budget`` / ``max_request_share`` / ``admit_fraction``: **admission by work**
  (:mod:`taskmoe.serving.admission`). A request costs ``n x (prompt tokens + max_tokens)`` work
  tokens; the work admitted and not yet done may not exceed the budget, one request may hold at
  most ``max_request_share`` of it, and the backlog plus the request must be predicted (from the
  measured prefill and decode-step seconds, :mod:`taskmoe.serving.costs`) to finish within
  ``admit_fraction x generation_timeout_s``. Refusals are 429 with a ``Retry-After`` from that
  prediction.
- ``queue_size``: rows (one per choice) waiting to start; a memory bound behind the work budget.
- ``max_batch`` / ``max_wait_ms``: at most ``max_batch`` rows of one routing key decode together
  (``batching="fifo"``: of all keys); a key with no running batch waits at most ``max_wait_ms``
  for batch-mates, then later rows join the running batch between steps.
- ``generation_timeout_s``: a request still unanswered after this long (queueing included) is
  halted within one decode step and answered 504 (or, mid-stream, with an error event).
- ``body_timeout_s``: a request body not fully received after this long (a client that sent a
  Content-Length and then less) is answered 408 and the connection closed.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskmoe.config import Config, check, doc

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_PROMPT_TOKENS = 4096
MAX_MAX_TOKENS = 1024
DEFAULT_MAX_TOKENS = 64
MAX_N = 8
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256
QUEUE_SIZE = 256
MAX_BATCH = 32
MAX_WAIT_MS = 5.0
GENERATION_TIMEOUT_S = 120.0
RETRY_AFTER_S = 1
TOKEN_BUDGET = 1 << 17  # work tokens admitted and not yet done
MAX_REQUEST_SHARE = 0.25
ADMIT_FRACTION = 0.5
BODY_TIMEOUT_S = 10.0
BATCHING = ("grouped", "fifo")


@dataclass
class Limits(Config):
    """Server limits (see the module docstring for what each one protects)."""

    max_body_bytes: int = doc(MAX_BODY_BYTES, "largest accepted request body in bytes (else 413)")
    max_prompt_tokens: int = doc(MAX_PROMPT_TOKENS, "longest accepted prompt in tokens after templating (else 413)")
    max_max_tokens: int = doc(MAX_MAX_TOKENS, "largest accepted max_tokens (else 400)")
    default_max_tokens: int = doc(DEFAULT_MAX_TOKENS, "max_tokens when a request does not set it")
    max_n: int = doc(MAX_N, "largest accepted n (choices per prompt), and most prompts in one completions request")
    max_stop: int = doc(MAX_STOP, "most stop sequences per request")
    max_stop_chars: int = doc(MAX_STOP_CHARS, "longest stop sequence in characters")
    max_messages: int = doc(MAX_MESSAGES, "most chat messages per request")
    queue_size: int = doc(QUEUE_SIZE, "rows (requests x n) that may wait for a batch before 429")
    max_batch: int = doc(MAX_BATCH, "most rows generated together in one batch")
    max_wait_ms: float = doc(MAX_WAIT_MS, "how long the oldest waiting request may wait for batch-mates")
    generation_timeout_s: float = doc(GENERATION_TIMEOUT_S, "seconds before an unanswered request is cancelled (504)")
    retry_after_s: int = doc(RETRY_AFTER_S, "Retry-After seconds of a 429 sent before any decode rate is measured")
    token_budget: int = doc(TOKEN_BUDGET, "work tokens (n x (prompt + max_tokens)) admitted and not yet done, at most")
    max_request_share: float = doc(MAX_REQUEST_SHARE, "largest share of token_budget one request may ask for (else 429)")
    admit_fraction: float = doc(ADMIT_FRACTION, "admit only work predicted to finish within this share of the timeout")
    body_timeout_s: float = doc(BODY_TIMEOUT_S, "seconds to receive a request body before answering 408")
    batching: str = doc("grouped", "grouped: max_batch rows per routing key; fifo: max_batch rows in all (baseline)")

    def validate(self) -> None:
        for name in (
            "max_body_bytes", "max_prompt_tokens", "max_max_tokens", "default_max_tokens", "max_n",
            "max_stop", "max_stop_chars", "max_messages", "queue_size", "max_batch", "retry_after_s",
        ):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"Limits.{name}: must be an integer >= 1, got {v!r}")
        check(isinstance(self.token_budget, int) and self.token_budget >= 1,
              f"Limits.token_budget: must be an integer >= 1, got {self.token_budget!r}")
        check(0 < self.max_request_share <= 1, f"Limits.max_request_share: must be in (0, 1], got {self.max_request_share!r}")
        check(0 < self.admit_fraction <= 1, f"Limits.admit_fraction: must be in (0, 1], got {self.admit_fraction!r}")
        check(self.body_timeout_s > 0, f"Limits.body_timeout_s: must be > 0, got {self.body_timeout_s!r}")
        check(self.batching in BATCHING, f"Limits.batching: must be one of {BATCHING}, got {self.batching!r}")
        check(self.max_wait_ms >= 0, f"Limits.max_wait_ms: must be >= 0, got {self.max_wait_ms!r}")
        check(self.generation_timeout_s > 0, f"Limits.generation_timeout_s: must be > 0, got {self.generation_timeout_s!r}")
        check(
            self.default_max_tokens <= self.max_max_tokens,
            f"Limits.default_max_tokens ({self.default_max_tokens}) exceeds max_max_tokens ({self.max_max_tokens})",
        )
        check(
            self.max_n * self.max_n <= self.queue_size,
            f"Limits.max_n ({self.max_n}) squared exceeds queue_size ({self.queue_size}): a completions request "
            "with max_n prompts x max_n choices could never be queued",
        )
