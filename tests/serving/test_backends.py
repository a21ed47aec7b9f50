"""DOE and IMoE backends: the routing key is the experts the model (gates) or the router select,
decided before batching; batches never mix keys; and a row's answer equals the model's own
generation for that prompt alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from serving_helpers import client, running
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.serving.app import create_app
from taskmoe.serving.backend import SamplingParams
from taskmoe.serving.backends import load_backend
from taskmoe.serving.limits import Limits
from taskmoe.serving.scheduler import Scheduler

TEXTS = ["def f(x):", "import json", "The JSON encoder", "[1, 2, 3]", "wrap text", "a",
         "class Foo:", "return None", "width = 70", "Hello there", "# comment", "raise ValueError"]


async def submit_all(backend, model, prompts, params, limits):
    sched = Scheduler(backend, limits)
    await sched.start()
    try:
        routes = [backend.route(model, ids) for ids in prompts]
        tickets = [sched.submit(r, [(ids, params)])[0] for r, ids in zip(routes, prompts)]
        return routes, [await t.result() for t in tickets], sched.batch_log
    finally:
        await sched.close()


# ------------------------------------------------------------------------------------ DOE
@pytest.fixture(scope="module")
def doe_folder(tokenizer, tmp_path_factory) -> Path:
    from taskmoe.doe.model import DOEConfig, build_doe, save_doe
    from taskmoe.models import LMConfig

    torch.manual_seed(0)  # with this seed the untrained gates send these prompts to all four experts
    model = build_doe(DOEConfig(lm=LMConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2),
                                experts=["e0", "e1", "e2", "e3"]))
    folder = tmp_path_factory.mktemp("doe") / "doe-tiny"
    save_doe(model, folder, extra_files={"tokenizer.json": lambda p: p.write_text(tokenizer.to_str())})
    return folder


def test_doe_route_is_the_decision_prefill_makes(doe_folder) -> None:
    b = load_backend(doe_folder)
    assert type(b).__name__ == "DOEBackend" and b.model_ids() == ["doe-tiny"]
    model = b.models["doe-tiny"]
    keys = set()
    for t in TEXTS:
        ids = b.encode_prompt(t)
        route = b.route("doe-tiny", ids)
        with torch.inference_mode():
            r = model(torch.tensor([ids]), model.init_state(1), logits_to_keep=1).routing
        assert route.key == ("doe-tiny", tuple(sorted(r.names[i] for i in r.ids[0].tolist() if i >= 0)))
        assert set(route.trace["experts"]) == set(route.key[1])
        keys.add(route.key)
    assert len(keys) >= 2  # otherwise this test could not see mixing


def test_doe_batches_never_mix_expert_sets_and_rows_equal_alone(doe_folder) -> None:
    b = load_backend(doe_folder)
    prompts = [b.encode_prompt(t) for t in TEXTS]
    routes, outcomes, log = asyncio.run(submit_all(b, "doe-tiny", prompts, SamplingParams(6, 0.0),
                                                   Limits(max_batch=32, max_wait_ms=1000)))
    keys = [r.key for r in routes]
    assert sorted(k for k, _ in log) == sorted(set(keys))  # one batch per expert set
    assert {k: n for k, n in log} == {k: keys.count(k) for k in set(keys)}
    model = b.models["doe-tiny"]
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0, stop_tokens=[b.tokenizer.eos_id])
    for ids, o in zip(prompts, outcomes):
        assert o.token_ids == generate(model, [ids], cfg)[0]


def test_doe_over_http_with_trace(doe_folder) -> None:
    b = load_backend(doe_folder)
    with running(create_app(b)) as srv:
        r = client(srv.url).completions.create(model="doe-tiny", prompt="import json", max_tokens=4, temperature=0,
                                               extra_body={"taskmoe": {"trace": True}})
    route = r.taskmoe["choices"][0]["route"]
    assert route["experts"] == list(b.route("doe-tiny", b.encode_prompt("import json")).trace["experts"])
    assert set(route["scores"]) == {"e0", "e1", "e2", "e3"}


# ----------------------------------------------------------------------------------- IMoE
def test_imoe_answers_equal_the_system_and_batches_group_by_selected_experts(imoe_run) -> None:
    import taskmoe

    root, prompts = imoe_run
    b = load_backend(root, name="imoe")
    assert type(b).__name__ == "SystemBackend" and b.model_ids() == ["imoe"]
    system = taskmoe.load(root)
    texts = [p for p in prompts.values() for _ in range(2)]
    ids = [b.encode_prompt(t) for t in texts]
    routes, outcomes, log = asyncio.run(submit_all(b, "imoe", ids, SamplingParams(8, 0.0),
                                                   Limits(max_batch=32, max_wait_ms=1000)))
    keys = [r.key for r in routes]
    assert len(set(keys)) >= 2  # the three domains do not all select the same experts
    assert {k: n for k, n in log} == {k: keys.count(k) for k in set(keys)}  # one batch per expert selection
    for t, r, o in zip(texts, routes, outcomes):
        alone = system.generate(t, max_new_tokens=8, temperature=0.0)
        if alone.trace.clarify:  # a written clarification is cut to max_tokens like any answer
            assert alone.text.startswith(o.text) and len(o.token_ids) == 8 and o.finish == "length"
        else:
            assert o.text == alone.text
        assert list(r.key) == [e.name for e in alone.trace.experts]
        assert o.trace["routing"]["selected"] == r.trace["selected"]


def test_imoe_over_http(imoe_run) -> None:
    root, prompts = imoe_run
    b = load_backend(root, name="imoe")
    with running(create_app(b)) as srv:
        c = client(srv.url)
        text = next(iter(prompts.values()))
        r = c.chat.completions.create(model="imoe", messages=[{"role": "user", "content": text}], max_tokens=8,
                                      temperature=0, extra_body={"taskmoe": {"trace": True}})
        tr = r.taskmoe["choices"][0]
        assert tr["route"]["experts"] and tr["generation"]["routing"]["selected"] == tr["route"]["selected"]
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="imoe", messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0, stream=True)
            if ch.choices)
        assert streamed == r.choices[0].message.content
        import openai

        with pytest.raises(openai.BadRequestError, match="single prompts"):
            c.chat.completions.create(model="imoe", max_tokens=2, messages=[
                {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])


# ------------------------------------------------------------------------ component health
def _corrupt(path: Path) -> None:
    """Truncate a safetensors file mid-tensor (its header still parses)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 3])


def test_corrupt_expert_fails_the_start_check_naming_the_file(imoe_run, tmp_path) -> None:
    import shutil

    from taskmoe.errors import CheckpointError
    from taskmoe.serving.serve import check_backend, serve

    root = tmp_path / "run"
    shutil.copytree(imoe_run[0], root)
    b = load_backend(root)
    assert sorted(check_backend(b)) == [f"expert {n}" for n in sorted(b.system.store.names)]
    assert b.system.store.stats().resident == []  # the check left nothing resident
    bad = root / "experts" / "c1" / "model.safetensors"
    _corrupt(bad)
    with pytest.raises(CheckpointError, match=r"expert 'c1'.*model\.safetensors"):
        check_backend(load_backend(root))
    with pytest.raises(CheckpointError, match="c1"):  # the command refuses before it listens
        serve(root, port=1, check_experts=True)


def test_expert_failing_later_is_503_naming_it_and_health_reports_it(imoe_run, tmp_path) -> None:
    import shutil

    import httpx

    root = tmp_path / "run"
    shutil.copytree(imoe_run[0], root)
    b = load_backend(root, name="imoe")  # no start check: experts load lazily
    prompts = list(imoe_run[1].values())
    keys = {t: b.route("imoe", b.encode_prompt(t)).key for t in prompts}
    victim = keys[prompts[0]][0]
    spared = next((t for t in prompts if victim not in keys[t]), None)
    _corrupt(root / "experts" / victim / "model.safetensors")
    with running(create_app(b)) as srv:
        body = {"model": "imoe", "prompt": prompts[0], "max_tokens": 4}
        for _ in range(2):  # the first request finds it; the second is refused before any work
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["param"] == f"expert {victim}" and err["code"] == "component_unavailable"
            assert victim in err["message"]
        h = httpx.get(srv.url + "/health").json()
        assert h["status"] == "degraded" and [f["component"] for f in h["failed"]] == [f"expert {victim}"]
        if spared is not None:  # requests that do not need it are still answered
            r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": spared}, timeout=60)
            assert r.status_code == 200


def test_imoe_rows_with_different_seeds_share_one_call_and_equal_alone(imoe_run) -> None:
    import taskmoe
    from taskmoe.serving.backend import Row

    root, prompts = imoe_run
    b = load_backend(root, name="imoe")
    calls = []
    real = b.system.generate_ids

    def counted(ids, **kw):
        calls.append(len(ids))
        return real(ids, **kw)

    b.system.generate_ids = counted
    text = next(iter(prompts.values()))
    ids = b.encode_prompt(text)
    params = [SamplingParams(6, 0.9, 1.0, s) for s in (5, 6, 7)] + [SamplingParams(6, 0.8)]
    out = b.generate_batch(b.route("imoe", ids), [Row(ids, p) for p in params])
    assert calls == [4]  # one pipeline call: every row decodes with its own generator
    system = taskmoe.load(root)
    for p, o in zip(params, out):
        alone = system.generate(text, max_new_tokens=6, temperature=p.temperature, seed=o.trace["seed"])
        assert b.tokenizer.decode(o.token_ids, skip_special=True) == alone.text or alone.trace.clarify


def test_imoe_row_stops_within_one_step_when_it_dies(imoe_run) -> None:
    from taskmoe.serving.backend import Row

    root, prompts = imoe_run
    b = load_backend(root, name="imoe")
    ids = b.encode_prompt(next(iter(prompts.values())))
    state = {"n": 0}

    def emit(tok: int) -> bool:
        state["n"] += 1
        return True

    alive = lambda: state["n"] < 2  # noqa: E731 - the client leaves after the second answer token
    (o,) = b.generate_batch(b.route("imoe", ids), [Row(ids, SamplingParams(40, 0.0, 1.0, None), emit, alive)])
    if not o.trace.get("clarify"):
        assert o.finish == "halted" and len(o.token_ids) <= 3 and o.trace["stopped"]["reason"] == "cancelled"
