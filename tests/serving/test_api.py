"""The HTTP API through the official ``openai`` client against a real server on a loopback port."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serving_helpers import client, running
from taskmoe.serving.app import create_app
from taskmoe.serving.limits import Limits

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Encode a list as JSON."}]


def test_models_list(server) -> None:
    ids = sorted(m.id for m in client(server.url).models.list())
    assert ids == ["expert", "transformer"]
    assert client(server.url).models.retrieve("expert").owned_by == "taskmoe"


def test_chat_completion_with_usage_and_trace(server, backend, tokenizer) -> None:
    r = client(server.url).chat.completions.create(
        model="expert", messages=CHAT, max_tokens=12, temperature=0, extra_body={"taskmoe": {"trace": True}})
    assert r.object == "chat.completion" and r.model == "expert" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # usage counts the templated prompt and the generated tokens
    assert r.usage.prompt_tokens == len(tokenizer.encode_chat(CHAT))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 12 or choice.finish_reason == "stop"
    # greedy decoding: the answer is what the model generates for that prompt, decoded
    from taskmoe.inference.generate import GenerationConfig, generate

    ids = generate(backend.models["expert"], [tokenizer.encode_chat(CHAT)],
                   GenerationConfig(max_new_tokens=12, temperature=0.0, stop_tokens=[tokenizer.eos_id]))[0]
    assert choice.message.content == tokenizer.decode(ids, skip_special=True)
    assert r.usage.completion_tokens == len(ids)
    trace = r.taskmoe["choices"][0]
    assert trace["route"] == {"model": "expert", "builder": "expert_lm"} and trace["generation"]["batch_rows"] >= 1


def test_completion_n_choices_and_seed_reproducible(server) -> None:
    c = client(server.url)
    kw = dict(model="transformer", prompt="def encode(obj):", max_tokens=8, n=3, seed=1234, temperature=1.0)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.object == "text_completion" and [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # same seed, same answers
    assert getattr(a, "taskmoe", None) is None  # no trace unless asked


def test_vanishing_temperature_and_top_p_are_greedy(server) -> None:
    """The T -> 0 and top_p -> 0 limits of sampling are greedy decoding (top_p=5e-324 rounds to 0
    in float32 and once masked every token: schemathesis found it)."""
    c = client(server.url)
    kw = dict(model="expert", prompt="import json", max_tokens=8)
    greedy = c.completions.create(**kw, temperature=0).choices[0].text
    assert c.completions.create(**kw, temperature=1e-300, seed=1).choices[0].text == greedy
    assert c.completions.create(**kw, top_p=5e-324, seed=2).choices[0].text == greedy


def test_streamed_chat_equals_non_streamed(server) -> None:
    c = client(server.url)
    kw = dict(model="expert", messages=CHAT, max_tokens=16, temperature=0)
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == full.choices[0].message.content and finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)


def test_sse_wire_format_ends_with_done(server) -> None:
    body = {"model": "expert", "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_sequence_cuts_the_answer(server) -> None:
    c = client(server.url)
    free = c.completions.create(model="expert", prompt="[1, 2", max_tokens=30, temperature=0).choices[0]
    text = free.text
    assert len(text) >= 3, f"the seeded tiny model must say something to cut, got {text!r}"
    stop = text[1:3]  # occurs first at index 1 (or 0)
    cut = c.completions.create(model="expert", prompt="[1, 2", max_tokens=30, temperature=0, stop=[stop]).choices[0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"


def _post(url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(url + path, timeout=60, **kw)


def _error(r: httpx.Response) -> dict:
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_malformed_requests(server) -> None:
    u = server.url
    r = _post(u, "/v1/chat/completions", content=b'{"model": "expert", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    r = _post(u, "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    _error(r)
    r = _post(u, "/v1/chat/completions", json={"model": "expert"})
    assert r.status_code == 422 and _error(r)["param"] == "messages"
    r = _post(u, "/v1/chat/completions", json={"model": "expert", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 422 and _error(r)["param"].startswith("messages.0.role")
    r = _post(u, "/v1/completions", json={"model": "expert", "prompt": "x", "temperature": 3})
    assert r.status_code == 422 and _error(r)["param"] == "temperature"
    r = _post(u, "/v1/completions", json={"model": "expert", "prompt": "x", "logprobs": 5})
    assert r.status_code == 422 and _error(r)["param"] == "logprobs"  # unsupported fields are named, not ignored
    # server limits are part of the schema (422) ...
    r = _post(u, "/v1/completions", json={"model": "expert", "prompt": "x", "max_tokens": 10**6})
    assert r.status_code == 422 and _error(r)["param"] == "max_tokens"
    r = _post(u, "/v1/completions", json={"model": "expert", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 422 and _error(r)["param"].startswith("stop")
    with pytest.raises(openai.UnprocessableEntityError):
        client(u).completions.create(model="expert", prompt="x", n=10**3)
    # ... and in /openapi.json
    spec = httpx.get(u + "/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
    assert Limits().max_max_tokens in [a.get("maximum") for a in spec["max_tokens"]["anyOf"]]
    r = _post(u, "/v1/completions", json={"model": "expert", "prompt": ["a"] * (Limits().max_n + 1)})
    assert r.status_code == 422 and _error(r)["param"].startswith("prompt")


def test_requests_cannot_name_files(server) -> None:
    r = _post(server.url, "/v1/completions", json={"model": "../../etc/passwd", "prompt": "x"})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    r = _post(server.url, "/v1/completions", json={"model": "expert", "prompt": "x", "file": "/etc/passwd"})
    assert r.status_code == 422 and _error(r)["param"] == "file"
    with pytest.raises(openai.NotFoundError):
        client(server.url).chat.completions.create(model="/tmp", messages=CHAT)


def test_oversized_body_and_prompt_are_413(backend) -> None:
    limits = Limits(max_body_bytes=4096, max_prompt_tokens=50)
    with running(create_app(backend, limits)) as srv:
        r = _post(srv.url, "/v1/completions", json={"model": "expert", "prompt": "a" * 5000})
        assert r.status_code == 413 and _error(r)["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b" " * 1000

        r = _post(srv.url, "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        with pytest.raises(openai.APIStatusError) as e:
            client(srv.url).completions.create(model="expert", prompt="word " * 200, max_tokens=2)
        assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"
        ok = client(srv.url).completions.create(model="expert", prompt="short", max_tokens=2)
        assert ok.choices


def _raw(url: str, path: str, body: dict) -> httpx.Response:
    """POST ``body`` as ASCII JSON, so a lone surrogate travels as the escape ``\\ud800``."""
    return httpx.post(url + path, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                      timeout=60)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "\udfff"}, {"role": "user", "content": "x"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]},
     "messages.0.content"),
    ("/v1/completions", {"prompt": "x\ud800y"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\ud800"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": "\ud83d"}, "stop"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, param) -> None:
    r = _raw(server.url, path, {"model": "expert", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    e = _error(r)
    assert e["code"] == "invalid_text" and e["param"].startswith(param) and "Unicode" in e["message"]
    r = _post(server.url, "/v1/completions", json={"model": "expert", "prompt": "still fine", "max_tokens": 2})
    assert r.status_code == 200  # and the connection pool / server are unharmed


def test_text_the_tokenizer_cannot_take_is_400(backend) -> None:
    from taskmoe.serving.backends.lm import LMBackend

    class Picky(LMBackend):
        def encode_prompt(self, text: str) -> list[int]:
            raise TypeError("TextInputSequence must be str")

    with running(create_app(Picky(backend.models, backend.tokenizer))) as srv:
        r = _post(srv.url, "/v1/completions", json={"model": "expert", "prompt": "x"})
        assert r.status_code == 400 and _error(r)["param"] == "prompt" and _error(r)["code"] == "invalid_text"


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("stream", "yes"), ("n", 1.5), ("seed", "1"),
                                          ("temperature", "0.5"), ("prompt", ""), ("prompt", [""])])
def test_strict_types_and_nonempty_prompts(server, field, value) -> None:
    """No coercion: what the schema does not allow is a 422 naming the field, never silently accepted."""
    r = _post(server.url, "/v1/completions", json={"model": "expert", "prompt": "x", "max_tokens": 2, field: value})
    assert r.status_code == 422 and _error(r)["param"].startswith(field), r.text


def test_api_key_guards_every_route_but_health(backend) -> None:
    app = create_app(backend, api_key="s3cret")
    paths = {getattr(r, "path", "") for r in app.routes} | {"/no/such/path"}
    assert {"/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models"} <= paths
    with running(app) as srv:
        for path in sorted(paths):
            url = srv.url + path.replace("{model_id}", "expert")
            for method in (httpx.get, httpx.post):
                r = method(url)
                if path == "/health":
                    assert r.status_code in (200, 405)
                    continue
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.status_code)
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(srv.url + "/docs", headers=ok).status_code == 200
        spec = httpx.get(srv.url + "/openapi.json", headers=ok).json()
        assert spec["security"] == [{"bearer": []}] and spec["paths"]["/health"]["get"]["security"] == []
        assert httpx.get(srv.url + "/metrics", headers=ok).status_code == 200


def test_bearer_auth(backend) -> None:
    with running(create_app(backend, api_key="s3cret")) as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv.url, api_key="wrong").models.list()
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert _error(r)["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # open for load balancers
        assert [m.id for m in client(srv.url, api_key="s3cret").models.list()] == ["expert", "transformer"]
        r = client(srv.url, api_key="s3cret").chat.completions.create(model="expert", messages=CHAT, max_tokens=2)
        assert r.choices


def test_health_and_metrics(server) -> None:
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["models"] == ["expert", "transformer"]
    client(server.url).completions.create(model="expert", prompt="x", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE taskmoe_requests_total counter" in text
    assert 'taskmoe_requests_total{route="/v1/completions",status="200"}' in text
    assert "taskmoe_batch_rows_count" in text and "taskmoe_completion_tokens_total" in text


def test_unknown_route_is_openai_error(server) -> None:
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and _error(r)
