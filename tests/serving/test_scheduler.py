"""The scheduler groups rows by routing key, runs each model once per step for a whole batch, rows
join a running batch between steps, and a row's answer never depends on its batch-mates or on who
joins or leaves (each equals ``inference.generate`` on that row alone).

Real backend: two tiny LMs (an expert_lm and a transformer_lm) served side by side, so requests
naming different models have different routing keys. Forward calls are counted with hooks.
"""

from __future__ import annotations

import asyncio

import pytest

from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.serving.admission import Refused
from taskmoe.serving.backend import Row, SamplingParams
from taskmoe.serving.backends.decode import RowBatch
from taskmoe.serving.backends.lm import LMBackend
from taskmoe.serving.limits import Limits
from taskmoe.serving.scheduler import Scheduler


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


def test_admit_is_all_or_none_when_the_queue_is_full(backend, tokenizer) -> None:
    async def main() -> None:
        sched = Scheduler(backend, Limits(queue_size=3, max_n=1, max_wait_ms=10_000, max_batch=8))
        await sched.start()
        try:
            ids = [tokenizer.bos_id]
            r = backend.route("expert", ids)
            sched.admit([r], [ids], 2, 2)
            sched.submit(r, [(ids, SamplingParams(2))] * 2)
            with pytest.raises(Refused) as e:
                sched.admit([r], [ids], 2, 2)
            assert e.value.code == "queue_full" and e.value.retry_after == sched.limits.retry_after_s
            assert sched.waiting_rows == 2  # the refused request left nothing behind
            t = sched.submit(r, [(ids, SamplingParams(2))])[0]
            t.cancel()
            assert sched.waiting_rows == 2 and (await t.result()).finish == "cancelled"
        finally:
            await sched.close()

    asyncio.run(main())


def test_rows_joining_between_steps_equal_each_row_alone(backend, tokenizer) -> None:
    """Continuous batching is exact: rows that join a running batch mid-way (other prompt lengths,
    other positions in their KV caches, sampled with their own seeds) and rows that leave early give
    each row exactly its solo ``generate`` output, and every step is ONE forward for all live rows."""
    model = backend.models["transformer"]  # attention: joined rows sit at other KV positions
    calls = count_forwards(model)
    enc = [[tokenizer.bos_id, *tokenizer.encode(t, allow_special=False)]
           for t in ["{", "def f(x):", "The JSON encoder", "wrap text", "[1, 2, 3]"]]
    params = [SamplingParams(9, 0.0), SamplingParams(6, 1.0, 1.0, 21), SamplingParams(8, 0.9, 0.8, 22),
              SamplingParams(5, 1.2, 1.0, 23), SamplingParams(7, 0.0)]
    batch = RowBatch(model, stop_ids=())
    got: dict[int, list[int]] = {}
    first = batch.add([Row(ids, p) for ids, p in zip(enc[:2], params[:2])])
    for _ in range(3):
        for h, r in batch.step():
            got[h] = r.token_ids
    later = batch.add([Row(ids, p) for ids, p in zip(enc[2:], params[2:])])  # join at step 3
    before = calls[0]
    steps = 0
    while len(batch):
        for h, r in batch.step():
            got[h] = r.token_ids
        steps += 1
    assert calls[0] - before <= steps  # one forward per step for every live row together (none after the last)
    for h, ids, p in zip(first + later, enc, params):
        cfg = GenerationConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed)
        assert got[h] == generate(model, [ids], cfg)[0], h


def test_dropped_row_costs_no_further_forward(backend, tokenizer) -> None:
    model = backend.models["expert"]
    calls = count_forwards(model)
    batch = RowBatch(model, stop_ids=())
    (h,) = batch.add([Row([tokenizer.bos_id, 50], SamplingParams(1000, 0.0))])
    batch.step()
    n = calls[0]
    assert batch.drop([h])[0][1].finish == "halted" and len(batch) == 0
    assert batch.step() == [] and calls[0] == n
