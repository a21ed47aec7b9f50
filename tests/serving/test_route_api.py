"""``POST /v1/route`` on a tiny IMoE run: the routing decision alone, equal to the system's router."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import taskmoe  # noqa: E402
from taskmoe.serving.app import create_app  # noqa: E402
from taskmoe.serving.backends import load_backend  # noqa: E402


@pytest.fixture(scope="module")
def served(imoe_run):
    root, prompts = imoe_run
    backend = load_backend(root, name="imoe")
    with TestClient(create_app(backend, api_key="k")) as client:
        yield root, client, prompts


def test_route_answers_the_routers_decision_with_adapter_folders(served):
    root, client, prompts = served
    system = taskmoe.load(root)
    for text in prompts.values():
        r = client.post("/v1/route", json={"prompt": text}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200, r.text
        body = r.json()
        d = system.route(text)
        assert [e["category"] for e in body["experts"]] == d.selected_names
        assert [e["confidence"] for e in body["experts"]] == pytest.approx([float(d.confidences[i]) for i in d.selected])
        assert body["trace"]["c_S"] == pytest.approx(d.c_S) and body["fallback"] == d.fallback
        for e in body["experts"]:
            assert e["lora_module"] == e["name"] and Path(e["adapter"]).name == e["name"]
    chat = client.post("/v1/route", json={"messages": [{"role": "user", "content": text}]},
                       headers={"Authorization": "Bearer k"}).json()
    assert chat["experts"] == body["experts"]


def test_route_refuses_bad_requests_and_needs_the_key(served):
    _, client, _ = served
    auth = {"Authorization": "Bearer k"}
    assert client.post("/v1/route", json={"prompt": "x"}).status_code == 401
    assert client.post("/v1/route", json={}, headers=auth).status_code == 400
    assert client.post("/v1/route", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                       headers=auth).status_code == 400
    assert client.post("/v1/route", json={"prompt": ""}, headers=auth).status_code in (400, 422)
    assert client.post("/v1/route", json={"prompt": "x", "model": "other"}, headers=auth).status_code == 400


def test_route_only_server_routes_but_generates_nothing(served):
    root, _, prompts = served
    text = next(iter(prompts.values()))
    with TestClient(create_app(load_backend(root, name="imoe"), route_only=True)) as client:
        r = client.post("/v1/route", json={"prompt": text})
        assert r.status_code == 200 and r.json()["experts"]
        assert client.get("/health").json()["status"] == "ok"
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["imoe"]
        for path in ("/v1/chat/completions", "/v1/completions"):
            gone = client.post(path, json={"model": "imoe", "prompt": text,
                                           "messages": [{"role": "user", "content": text}]})
            assert gone.status_code == 404 and "error" in gone.json()
        assert "/v1/chat/completions" not in client.get("/openapi.json").json()["paths"]


def test_route_only_needs_a_router(backend):
    from taskmoe.errors import ConfigError

    with pytest.raises(ConfigError, match="--route-only needs a system that routes"):
        create_app(backend, route_only=True)
