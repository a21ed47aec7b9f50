"""Server metrics on ``prometheus_client``: one :class:`ServerMetrics` per app, its own registry.

Each app owns a ``CollectorRegistry`` (not the process-global one), so several servers in one
process (tests, notebooks) never collide and ``GET /metrics`` shows only its own server.
``prometheus_client`` metrics are thread-safe, so the event loop and the generation thread update
them directly. The ``*_created`` samples are left out (``disable_created_metrics``) to keep the
exposition small; ``render()`` is ``generate_latest`` (text format 0.0.4).

Names are the ones the server always exported (``taskmoe_requests_total``,
``taskmoe_batch_rows``, ...); :meth:`ServerMetrics.value` reads a sample back for the CLI summary
and tests.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

disable_created_metrics()


class ServerMetrics:
    """The metrics the taskmoe server exports, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("taskmoe_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.rejected = Counter("taskmoe_queue_rejected", "requests refused with 429 (admission by work)", registry=r)
        self.cancelled = Counter("taskmoe_rows_cancelled", "rows halted because the client disconnected or timed out",
                                 registry=r)
        self.timeouts = Counter("taskmoe_request_timeouts", "requests answered 504 (deadline passed)", registry=r)
        self.prompt_tokens = Counter("taskmoe_prompt_tokens", "prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("taskmoe_completion_tokens", "tokens generated", registry=r)
        self.batches = Counter("taskmoe_batches", "groups of rows that started generating together", registry=r)
        self.steps = Counter("taskmoe_decode_steps", "scheduler steps (one decode step of every running batch)",
                             registry=r)
        self.batch_rows = Histogram("taskmoe_batch_rows", "rows per group that started together", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_rows = Gauge("taskmoe_queue_rows", "rows waiting to start", registry=r)
        self.running_rows = Gauge("taskmoe_running_rows", "rows being generated", registry=r)
        self.backlog_tokens = Gauge("taskmoe_backlog_tokens", "estimated work tokens admitted and not yet done",
                                    registry=r)
        self.backlog_seconds = Gauge("taskmoe_backlog_seconds", "predicted seconds until the admitted work is done",
                                     registry=r)
        self.decode_rate = Gauge("taskmoe_work_tokens_per_second", "measured throughput in work tokens per busy "
                                 "second (EWMA; shown, admission predicts seconds instead)", registry=r)
        self.queue_wait = Histogram("taskmoe_queue_wait_seconds", "time a row waited before it started generating",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("taskmoe_request_seconds", "request latency from arrival to last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of this server's metrics."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """The current value of sample ``name`` (e.g. ``taskmoe_batches_total``), 0 when absent."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else float(v)
