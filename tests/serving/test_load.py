"""Backpressure, concurrency and cancellation against a real server.

A long-running stream keeps the single generation thread busy (the backend generates without a
stop token, so a row always runs to max_tokens); with max_batch=1 and queue_size=2 the queue state
is then fully determined, and read from /health before the request that must be refused.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import openai
import pytest

from serving_helpers import client, running
from taskmoe.serving.app import create_app
from taskmoe.serving.backends.lm import LMBackend
from taskmoe.serving.limits import Limits


def wait_for(url: str, cond, timeout: float = 30.0) -> dict:
    t0 = time.monotonic()
    while True:
        h = httpx.get(url + "/health").json()
        if cond(h):
            return h
        assert time.monotonic() - t0 < timeout, f"server never reached the expected state: {h}"
        time.sleep(0.01)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


@pytest.fixture
def busy_backend(backend) -> LMBackend:
    return LMBackend(backend.models, backend.tokenizer, stop_ids=())  # rows always run to max_tokens


def test_full_queue_answers_429_with_retry_after_and_disconnect_cancels(busy_backend) -> None:
    limits = Limits(max_batch=1, queue_size=2, max_n=1, max_wait_ms=0, retry_after_s=3, max_max_tokens=10**6)
    body = {"model": "expert", "prompt": "x", "stream": True, "max_tokens": 10**6}  # runs until cancelled
    with running(create_app(busy_backend, limits)) as srv:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", srv.url + "/v1/completions", json=body) as long_stream:
                lines = long_stream.iter_lines()  # keep a reference: dropping the iterator closes the stream
                assert next(lines).startswith("data: ")  # its row is generating now
                wait_for(srv.url, lambda h: h["running_rows"] == 1)
                pool = cf.ThreadPoolExecutor(2)
                short = {**body, "stream": False, "max_tokens": 4}
                waiting = [pool.submit(httpx.post, srv.url + "/v1/completions", json=short, timeout=60)
                           for _ in range(2)]
                wait_for(srv.url, lambda h: h["queue_rows"] == 2)
                with pytest.raises(openai.RateLimitError) as e:
                    client(srv.url).completions.create(model="expert", prompt="y", max_tokens=1)
                assert e.value.response.headers["retry-after"] == "3"
                assert e.value.body["code"] == "queue_full"
            # the long stream is closed here: only halting its row lets the queued requests run
            for f in waiting:
                r = f.result()
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            assert metric(srv.url, "taskmoe_rows_cancelled_total") == 1
            assert metric(srv.url, "taskmoe_queue_rejected_total") == 1
            pool.shutdown()


def test_32_concurrent_requests_all_answered_and_batched(backend) -> None:
    with running(create_app(backend, Limits(max_batch=32, max_wait_ms=20))) as srv:
        c = client(srv.url)

        def one(i: int):
            if i % 2:
                return c.completions.create(model="expert", prompt=f"item {i}", max_tokens=16, temperature=0)
            return c.chat.completions.create(model="expert", messages=[{"role": "user", "content": f"n={i}"}],
                                             max_tokens=16, seed=i)

        with cf.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(32)))  # any 4xx/5xx raises here
        assert len(results) == 32 and all(r.choices for r in results)
        statuses = [line for line in httpx.get(srv.url + "/metrics").text.splitlines()
                    if line.startswith("taskmoe_requests_total{")]
        assert not [s for s in statuses if 'status="5' in s], statuses
        assert metric(srv.url, "taskmoe_batches_total") < 32  # rows shared batches


def test_generation_timeout_is_504(busy_backend) -> None:
    limits = Limits(generation_timeout_s=0.2, max_max_tokens=1024, default_max_tokens=1024)
    with running(create_app(busy_backend, limits)) as srv:
        with pytest.raises(openai.APIStatusError) as e:
            client(srv.url).completions.create(model="expert", prompt="x", max_tokens=1024)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
        wait_for(srv.url, lambda h: h["running_rows"] == 0)  # the row was halted, not left running
