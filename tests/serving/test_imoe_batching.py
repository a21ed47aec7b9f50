"""Continuous batching of an IMoE run in the scheduler: a request that arrives while a long IMoE
request is decoding joins between steps and is answered before the long one ends (counted in the
long row's decode steps, recorded in the generation thread, not in wall time); joined rows equal
their solo ``System.generate`` runs; cancelling one joined request does not disturb the others."""

from __future__ import annotations

import asyncio

import pytest

import taskmoe
from taskmoe.serving.backend import SamplingParams
from taskmoe.serving.backends import load_backend
from taskmoe.serving.limits import Limits
from taskmoe.serving.scheduler import Scheduler

LONG = 60


@pytest.fixture(scope="module")
def served(imoe_run):
    root, prompts = imoe_run
    return load_backend(root, name="imoe"), taskmoe.load(root), prompts


def _limits() -> Limits:
    return Limits(max_batch=8, max_wait_ms=0.0, token_budget=100_000, max_request_share=1.0)


async def _first_piece(sink: asyncio.Queue) -> None:
    while True:
        _i, piece = await sink.get()
        if piece:
            return


def _watch(ticket, other, seen: list[int]) -> None:
    """Record ``other.generated`` (the long row's answer tokens so far) at each of ``ticket``'s tokens,
    in the generation thread as they are produced (no event-loop lag)."""
    emit = ticket.row.emit

    def watched(tok: int) -> bool:
        seen.append(other.generated)
        return emit(tok)

    ticket.row.emit = watched


def test_a_request_arriving_mid_decode_is_answered_before_the_long_one_ends(served) -> None:
    b, system, prompts = served
    long_text, short_text = prompts["code"], prompts["legal"]
    long_ids, short_ids = b.encode_prompt(long_text), b.encode_prompt(short_text)
    seen: list[int] = []

    async def main():
        sched = Scheduler(b, _limits())
        await sched.start()
        try:
            sink: asyncio.Queue = asyncio.Queue()
            (long,) = sched.submit(b.route("imoe", long_ids), [(long_ids, SamplingParams(LONG, 0.0))], sink=sink)
            await _first_piece(sink)  # the long request is writing its answer
            at_join = long.generated
            (short,) = sched.submit(b.route("imoe", short_ids), [(short_ids, SamplingParams(3, 0.0))])
            _watch(short, long, seen)  # before the worker can plan again: we have not awaited since submit
            s = await short.result()
            return at_join, s, await long.result()
        finally:
            await sched.close()

    at_join, s, lo = asyncio.run(main())
    assert lo.token_ids == system.generate(long_text, max_new_tokens=LONG, temperature=0.0).ids
    assert len(lo.token_ids) == LONG  # the long row really is long: the test can fail
    assert s.text == system.generate(short_text, max_new_tokens=3, temperature=0.0).text and len(seen) == 3
    # the short row drafts (draft_tokens = 8 steps) and answers while the long row decodes beside it,
    # one step each per round: its first token comes within ~draft_tokens + 2 of the long row's steps
    assert seen[0] - at_join <= system.config.draft_tokens + 4, (at_join, seen)
    assert seen[-1] < LONG - 20, seen  # done while the long row still had most of its answer to write


def test_joined_rows_equal_solo_and_cancelling_one_request_leaves_the_others(served) -> None:
    b, system, prompts = served
    texts = [prompts["code"], prompts["legal"], prompts["code"], prompts["legal"]]
    params = [SamplingParams(30, 0.0), SamplingParams(20, 1.0, 1.0, 7), SamplingParams(12, 0.9, 0.9, 8),
              SamplingParams(LONG, 0.0)]
    ids = [b.encode_prompt(t) for t in texts]

    async def main():
        sched = Scheduler(b, _limits())
        await sched.start()
        try:
            sink: asyncio.Queue = asyncio.Queue()
            first = sched.submit(b.route("imoe", ids[0]), [(ids[0], params[0])], sink=sink)
            await _first_piece(sink)
            later = [sched.submit(b.route("imoe", i), [(i, p)], sink=(q := asyncio.Queue()))[0] for i, p in
                     zip(ids[1:], params[1:])]
            victim = later[2]  # the long row: cancelled (client gone) after a few of its tokens
            while victim.generated < 3:
                await asyncio.sleep(0.005)
            victim.cancel()
            return [await t.result() for t in first + later], q
        finally:
            await sched.close()

    outs, _ = asyncio.run(main())
    for t, p, o in zip(texts[:3], params[:3], outs[:3]):
        seed = o.trace["seed"]
        alone = system.generate(t, max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=seed)
        assert o.token_ids == alone.ids and o.finish in ("stop", "length")
    v = outs[3]
    assert v.finish == "cancelled" and 3 <= len(v.token_ids) < LONG
    assert v.token_ids == system.generate(texts[3], max_new_tokens=LONG, temperature=0.0).ids[: len(v.token_ids)]
