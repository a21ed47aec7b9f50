"""Server metrics and their Prometheus text exposition (format 0.0.4).

A dependency-free registry of the three metric types the server needs: counters, gauges and
histograms, each optionally labelled. Updates come from the event loop and from the generation
thread, so every update takes one lock. ``render()`` returns the text ``GET /metrics`` serves.
"""

from __future__ import annotations

import math
import threading
from typing import Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, registry: "Registry", name: str, help: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = registry.lock
        registry.metrics.append(self)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name}: labels {sorted(labels)} != {sorted(self.label_names)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count."""

    kind = "counter"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        if not self._values and not self.label_names:
            return [f"{self.name} 0"]
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self._values.items())]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(self, registry: "Registry", name: str, help: str, buckets: Iterable[float], labels: Iterable[str] = ()) -> None:
        super().__init__(registry, name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(k, [0] * len(self.buckets))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
            self._sums[k] = self._sums.get(k, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            c = self._counts.get(self._key(labels))
            return c[-1] if c else 0

    def sum(self, **labels: str) -> float:
        with self._lock:
            return self._sums.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        out = []
        for k in sorted(self._counts):
            for b, c in zip(self.buckets, self._counts[k]):
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {c}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_num(self._sums[k])}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {self._counts[k][-1]}")
        return out


class Registry:
    """A set of metrics rendered together."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        with self.lock:
            lines: list[str] = []
            for m in self.metrics:
                lines += m.header() + m.lines()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The metrics the taskmoe server exports."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = Counter(r, "taskmoe_requests_total", "HTTP requests answered, by route and status code", ["route", "status"])
        self.rejected = Counter(r, "taskmoe_queue_rejected_total", "requests refused with 429 because the queue was full")
        self.cancelled = Counter(r, "taskmoe_rows_cancelled_total", "rows halted because the client disconnected or timed out")
        self.prompt_tokens = Counter(r, "taskmoe_prompt_tokens_total", "prompt tokens admitted")
        self.completion_tokens = Counter(r, "taskmoe_completion_tokens_total", "tokens generated")
        self.batches = Counter(r, "taskmoe_batches_total", "batches run by the scheduler")
        self.batch_rows = Histogram(r, "taskmoe_batch_rows", "rows per batch", BATCH_BUCKETS)
        self.queue_rows = Gauge(r, "taskmoe_queue_rows", "rows waiting for a batch")
        self.running_rows = Gauge(r, "taskmoe_running_rows", "rows being generated")
        self.queue_wait = Histogram(r, "taskmoe_queue_wait_seconds", "time a row waited before its batch started", LATENCY_BUCKETS)
        self.latency = Histogram(r, "taskmoe_request_seconds", "request latency from admission to last byte", LATENCY_BUCKETS, ["route"])

    def render(self) -> str:
        return self.registry.render()
