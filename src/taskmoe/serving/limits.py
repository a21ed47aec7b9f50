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
- ``queue_size``: requests waiting for a batch (counted in rows, one per choice); when full the
  server answers 429 with ``Retry-After: retry_after_s`` instead of queueing without bound.
- ``max_batch`` / ``max_wait_ms``: the scheduler waits at most ``max_wait_ms`` after a request's
  arrival for more requests with the same routing key, and runs at most ``max_batch`` rows at once.
- ``generation_timeout_s``: a request still unanswered after this long (queueing included) is
  cancelled and answered 504 (or, mid-stream, with an error event).
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
    retry_after_s: int = doc(RETRY_AFTER_S, "Retry-After seconds sent with a 429")

    def validate(self) -> None:
        for name in (
            "max_body_bytes", "max_prompt_tokens", "max_max_tokens", "default_max_tokens", "max_n",
            "max_stop", "max_stop_chars", "max_messages", "queue_size", "max_batch", "retry_after_s",
        ):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"Limits.{name}: must be an integer >= 1, got {v!r}")
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
