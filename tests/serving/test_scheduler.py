"""The scheduler groups rows by routing key, runs each model once per step for a whole batch, and
a row's answer never depends on its batch-mates (each equals ``inference.generate`` on that row alone).

Real backend: two tiny LMs (an expert_lm and a transformer_lm) served side by side, so requests
naming different models have different routing keys. Forward calls are counted with hooks.
"""

from __future__ import annotations

import asyncio

import pytest

from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.serving.backend import SamplingParams
from taskmoe.serving.backends.lm import LMBackend
from taskmoe.serving.limits import Limits
from taskmoe.serving.scheduler import QueueFull, Scheduler


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


async def run_all(backend, limits, submissions):
    """submissions: [(model_id, prompt_ids, SamplingParams)] submitted at once; -> (outcomes, batch_log)."""
    sched = Scheduler(backend, limits)
    await sched.start()
    try:
        tickets = [sched.submit(backend.route(m, ids), [(ids, p)])[0] for m, ids, p in submissions]
        outcomes = [await t.result() for t in tickets]
    finally:
        await sched.close()
    return outcomes, sched.batch_log


@pytest.fixture
def fixed_length_backend(models_dir):
    """Freshly loaded models (hooks stay local to the test); rows always run to max_tokens."""
    return LMBackend.load(models_dir, stop_ids=())


def test_batches_group_rows_by_routing_key(fixed_length_backend, tokenizer) -> None:
    b = fixed_length_backend
    calls = {m: count_forwards(model) for m, model in b.models.items()}
    prompt = tokenizer.encode("value = ", allow_special=False)
    subs = [("expert" if i % 2 == 0 else "transformer", [tokenizer.bos_id, *prompt], SamplingParams(5, 0.0))
            for i in range(16)]  # interleaved: expert, transformer, expert, ...
    outcomes, log = asyncio.run(run_all(b, Limits(max_batch=4, max_wait_ms=1000), subs))
    assert sorted(log) == [("expert", 4)] * 2 + [("transformer", 4)] * 2  # never mixed, always full
    assert all(len(o.token_ids) == 5 and o.finish == "length" for o in outcomes)
    # one prefill + 4 decode steps per batch: 2 batches x 5 forwards per model for 8 rows
    assert calls == {"expert": [10], "transformer": [10]}
    # rows with the same prompt and greedy decoding give the same answer whatever their batch
    for m in ("expert", "transformer"):
        assert len({tuple(o.token_ids) for (mm, _, _), o in zip(subs, outcomes) if mm == m}) == 1


def test_one_request_at_a_time_runs_one_forward_per_row_and_step(fixed_length_backend, tokenizer) -> None:
    b = fixed_length_backend
    calls = count_forwards(b.models["expert"])
    subs = [("expert", [tokenizer.bos_id, 40 + i], SamplingParams(5, 0.0)) for i in range(6)]
    _, log = asyncio.run(run_all(b, Limits(max_batch=1, max_wait_ms=0), subs))
    assert log == [("expert", 1)] * 6 and calls == [30]


def test_mixed_batch_rows_equal_each_row_alone(backend, tokenizer) -> None:
    """Different prompt lengths, max_tokens, temperatures, top_p and seeds in one batch; each row's
    tokens equal ``inference.generate`` run on that row alone with the row's settings and seed."""
    texts = ["{", "def f(x):", "The JSON encoder", "[1, 2, 3, 4, 5]", "wrap text", "a"]
    params = [SamplingParams(12, 0.0), SamplingParams(7, 1.0, 1.0, 11), SamplingParams(12, 0.8, 0.9, 12),
              SamplingParams(3, 0.0), SamplingParams(12, 1.3, 0.5, 13), SamplingParams(9, 0.7, 1.0, 14)]
    subs = [("expert", [tokenizer.bos_id, *tokenizer.encode(t, allow_special=False)], p) for t, p in zip(texts, params)]
    outcomes, log = asyncio.run(run_all(backend, Limits(max_batch=8, max_wait_ms=1000), subs))
    assert log == [("expert", 6)]
    for (_, ids, p), o in zip(subs, outcomes):
        cfg = GenerationConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                               stop_tokens=[tokenizer.eos_id], seed=p.seed)
        alone = generate(backend.models["expert"], [ids], cfg)[0]
        assert o.token_ids == alone
        assert o.finish == ("length" if len(alone) == p.max_tokens else "stop")
        assert o.text == tokenizer.decode(alone, skip_special=True)


def test_submit_is_all_or_none_when_the_queue_is_full(backend, tokenizer) -> None:
    async def main() -> None:
        sched = Scheduler(backend, Limits(queue_size=3, max_n=1, max_wait_ms=10_000, max_batch=8))
        await sched.start()
        try:
            ids = [tokenizer.bos_id]
            r = backend.route("expert", ids)
            sched.submit(r, [(ids, SamplingParams(2))] * 2)
            with pytest.raises(QueueFull):
                sched.submit(r, [(ids, SamplingParams(2))] * 2)
            assert sched.waiting_rows == 2  # the refused request left nothing behind
            t = sched.submit(r, [(ids, SamplingParams(2))])[0]
            t.cancel()
            assert sched.waiting_rows == 2 and (await t.result()).finish == "cancelled"
        finally:
            await sched.close()

    asyncio.run(main())
