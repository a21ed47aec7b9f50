"""Admission by work, continuous batching, cancellation and timeouts against a real server.

The "busy" backend generates without a stop token, so a row always runs to max_tokens (or until it
is cancelled); forward calls are counted with a pre-forward hook on the served model.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import socket
import time

import httpx
import openai
import pytest

from serving_helpers import client, running
from taskmoe.serving.app import create_app
from taskmoe.serving.backends.lm import LMBackend
from taskmoe.serving.limits import Limits

LONG = 100_000


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
def busy_backend(models_dir) -> LMBackend:
    return LMBackend.load(models_dir, stop_ids=())  # fresh models (hooks stay local); rows run to max_tokens


def big(**kw) -> Limits:
    return Limits(**{"max_max_tokens": LONG, "token_budget": 10 * LONG, "max_request_share": 1.0, **kw})


def short_request(url: str) -> float:
    t0 = time.monotonic()
    r = client(url).completions.create(model="expert", prompt="y", max_tokens=4)
    assert r.usage.completion_tokens == 4
    return time.monotonic() - t0


def test_disconnected_stream_stops_within_one_step_and_the_next_request_is_fast(busy_backend) -> None:
    model = busy_backend.models["expert"]
    state = {"forwards": 0, "after_cancel": 0}
    app = create_app(busy_backend, big())
    metrics = app.state.metrics
    with running(app) as srv:

        def hook(*_):
            state["forwards"] += 1
            if metrics.value("taskmoe_rows_cancelled_total") >= 1:
                state["after_cancel"] += 1

        model.register_forward_pre_hook(hook)
        baseline = short_request(srv.url)
        body = {"model": "expert", "prompt": "x", "stream": True, "max_tokens": LONG}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", srv.url + "/v1/completions", json=body) as s:
                lines = (line for line in s.iter_lines() if line)
                for _ in range(5):
                    assert next(lines).startswith("data: ")
        wait_for(srv.url, lambda h: h["running_rows"] == 0 and h["backlog_tokens"] == 0)
        assert metric(srv.url, "taskmoe_rows_cancelled_total") == 1
        assert state["after_cancel"] <= 1, state  # at most the forward already running when it was cancelled
        settled = state["forwards"]
        time.sleep(0.2)
        assert state["forwards"] == settled  # nothing decodes for nobody
        assert short_request(srv.url) < max(2.0, 10 * baseline)


def test_a_long_request_does_not_block_a_short_one(busy_backend) -> None:
    """Continuous batching: the short request joins the running batch and finishes while the long one runs."""
    with running(create_app(busy_backend, big())) as srv:
        body = {"model": "expert", "prompt": "x", "stream": True, "max_tokens": 3000}  # within the allowance
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", srv.url + "/v1/completions", json=body) as s:
                lines = (line for line in s.iter_lines() if line)
                assert next(lines).startswith("data: ")
                # admission measures its rate when a decode slice ends; before that it takes only one batch's
                # worth and would refuse the short request, so wait until a rate stands
                wait_for(srv.url, lambda h: (h.get("work_tokens_per_s") or 0) > 0)
                t = short_request(srv.url)
                assert wait_for(srv.url, lambda h: True)["running_rows"] == 1  # the long row still runs
                assert t < 5.0


def test_busy_server_refuses_early_with_429_and_retry_after(busy_backend) -> None:
    with running(create_app(busy_backend, big(token_budget=LONG + 10, max_request_share=1.0))) as srv:
        body = {"model": "expert", "prompt": "x", "stream": True, "max_tokens": LONG}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", srv.url + "/v1/completions", json=body) as s:
                lines = (line for line in s.iter_lines() if line)
                assert next(lines).startswith("data: ")
                h = wait_for(srv.url, lambda h: h["work_tokens_per_s"])
                batches = metric(srv.url, "taskmoe_batches_total")
                with pytest.raises(openai.RateLimitError) as e:
                    client(srv.url).completions.create(model="expert", prompt="y", max_tokens=64)
                wait = int(e.value.response.headers["retry-after"])
                assert e.value.body["code"] == "server_busy"
                # the backlog is ~LONG tokens; Retry-After is the time to drain what does not fit
                assert wait >= 1 and wait >= (h["backlog_tokens"] - (LONG + 10)) / h["work_tokens_per_s"] - 1
                assert metric(srv.url, "taskmoe_batches_total") == batches  # refused before any work
        with pytest.raises(openai.RateLimitError) as e:  # over one request's share, even when idle
            client(srv.url).completions.create(model="expert", prompt=["a", "b"], n=2, max_tokens=LONG)
        assert e.value.body["code"] == "request_over_share" and "retry-after" not in e.value.response.headers


def test_overload_burst_gives_only_200_and_429(busy_backend) -> None:
    limits = Limits(token_budget=2_000, max_request_share=0.25, generation_timeout_s=15.0, max_batch=16)
    with running(create_app(busy_backend, limits)) as srv:
        body = {"model": "expert", "prompt": "burst", "max_tokens": 64}
        with cf.ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(lambda _: httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code,
                                  range(96)))
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes


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
        assert metric(srv.url, "taskmoe_decode_steps_total") < 32 * 16  # rows shared steps


def test_generation_timeout_is_504_logged_once_without_traceback(busy_backend, caplog) -> None:
    limits = Limits(generation_timeout_s=0.3, max_max_tokens=LONG, token_budget=10 * LONG, max_request_share=1.0)
    with caplog.at_level(logging.WARNING):
        with running(create_app(busy_backend, limits)) as srv:
            with pytest.raises(openai.APIStatusError) as e:
                client(srv.url).completions.create(model="expert", prompt="x", max_tokens=LONG)
            assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
            wait_for(srv.url, lambda h: h["running_rows"] == 0)  # the row was halted, not left running
    lines = [r for r in caplog.records if "504" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "never retrieved" not in caplog.text and "Traceback" not in caplog.text


def test_body_shorter_than_content_length_is_408(backend, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        with running(create_app(backend, Limits(body_timeout_s=0.5))) as srv:
            with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"model\": ")
                t0 = time.monotonic()
                data = b""
                while chunk := sock.recv(65536):  # the server answers, then closes the connection
                    data += chunk
                assert time.monotonic() - t0 < 5
            assert data.startswith(b"HTTP/1.1 408") and b"body_timeout" in data
            assert httpx.get(srv.url + "/health").status_code == 200
    lines = [r for r in caplog.records if "408" in r.getMessage()]
    assert len(lines) == 1 and "Traceback" not in caplog.text


def test_a_scheduler_failure_fails_its_rows_instead_of_hanging(backend) -> None:
    class Broken(LMBackend):
        def open_batch(self, route):
            raise RuntimeError("boom")

    with running(create_app(Broken(backend.models, backend.tokenizer), Limits(generation_timeout_s=60))) as srv:
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"model": "expert", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert time.monotonic() - t0 < 10
        assert httpx.get(srv.url + "/health").json()["running_rows"] == 0


def test_streamed_timeout_is_an_error_event_logged_once(busy_backend, caplog) -> None:
    limits = Limits(generation_timeout_s=0.3, max_max_tokens=LONG, token_budget=10 * LONG, max_request_share=1.0)
    with caplog.at_level(logging.WARNING):
        with running(create_app(busy_backend, limits)) as srv:
            body = {"model": "expert", "prompt": "x", "stream": True, "max_tokens": LONG}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as s:
                events = [line for line in s.iter_lines() if line]
            assert json.loads(events[-2][len("data: "):])["error"]["code"] == "timeout" and events[-1] == "data: [DONE]"
            wait_for(srv.url, lambda h: h["running_rows"] == 0)
    assert len([r for r in caplog.records if "504" in r.getMessage()]) == 1
    assert "never retrieved" not in caplog.text and "Traceback" not in caplog.text
