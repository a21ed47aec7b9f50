"""Admission by work in seconds: the measured rates (fake clocks, planted costs), the prediction, the rule.

Every number is planted: joins and batch steps advance a fake clock by a known
``A_P x rows + S_P x prompt tokens`` and ``A x 1 + B x rows``, so the fitted rates and every
prediction are checked exactly.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest

from taskmoe.serving import scheduler as scheduler_module
from taskmoe.serving.admission import Admission, Refused, RowWork
from taskmoe.serving.costs import CostModel, KeyedFit
from taskmoe.serving.limits import Limits
from taskmoe.serving.metrics import ServerMetrics

A, B = 0.5, 0.25  # planted decode: s per batch step, s per row in a step
A_P, S_P = 0.1, 0.001  # planted prefill: s per joining row, s per prompt token


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class FakeBatch:
    """A step batch on the fake clock: a join costs A_P x rows + S_P x tokens, a step scale x (A + B x rows)."""

    def __init__(self, clock: Clock, steps: int, scale: float = 1.0) -> None:
        self.clock, self.steps, self.scale, self.rows = clock, steps, scale, {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows) -> list[int]:
        self.clock.now += A_P * len(rows) + S_P * sum(len(r.prompt_ids) for r in rows)
        handles = list(range(len(self.rows), len(self.rows) + len(rows)))
        self.rows.update({h: 0 for h in handles})
        return handles

    def drop(self, handles):
        return []

    def step(self):
        self.clock.now += self.scale * (A + B * len(self.rows))
        for h in list(self.rows):
            self.rows[h] += 1
            if self.rows[h] >= self.steps:
                del self.rows[h]
        return []


def ticket(prompt: int) -> SimpleNamespace:
    return SimpleNamespace(row=SimpleNamespace(prompt_ids=[1] * prompt), alive=lambda: True, rounds=0)


def run_slice(monkeypatch, costs: CostModel, plan: list[tuple[str, int, int, int, float]]) -> list:
    """One decode slice of batches (key, rows, prompt tokens per row, steps, cost scale); SLICE_S wide open."""
    clock = Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    monkeypatch.setattr(scheduler_module, "SLICE_S", math.inf)
    runs = [scheduler_module._Running(SimpleNamespace(key=key), FakeBatch(clock, steps, scale))
            for key, _, _, steps, scale in plan]
    joins = [(run, [ticket(p) for _ in range(rows)]) for run, (_, rows, p, _, _) in zip(runs, plan)]
    errors = scheduler_module._decode_slice(runs, joins, [], threading.Event(), lambda *_: None, ServerMetrics(),
                                            costs)
    assert not errors
    return [t for _, ts in joins for t in ts]


def test_prefill_heavy_join_does_not_inflate_the_decode_estimate(monkeypatch) -> None:
    light, heavy = CostModel(max_batch=32), CostModel(max_batch=32)
    for c, prompt in ((light, 4), (heavy, 4000)):  # the same decode, 1000x the prompt tokens
        for _ in range(2):
            run_slice(monkeypatch, c, [("x", 1, prompt, 6, 1.0), ("y", 3, 7, 4, 1.0)])
    for c in (light, heavy):
        assert c.decode.all.coefficients() == pytest.approx((A, B))  # decode steps fit alone, prefill apart
        assert c.prefill.all.coefficients() == pytest.approx((A_P, S_P))
    row = [RowWork("x", 0, 10)]
    assert heavy.predict(row) == light.predict(row) == pytest.approx(10 * (A + B))
    # the old single rate (work tokens per busy second) is what a prefill spike inflates
    old = {prompt: Admission(Limits()) for prompt in (4, 4000)}
    for prompt, adm in old.items():
        decode_s = 6 * (A + B) + 4 * (A + 3 * B)
        adm.observe(tokens=prompt + 21 + 6 + 3 * 4, seconds=A_P * 4 + S_P * (prompt + 21) + decode_s)
    assert old[4000].throughput > 10 * old[4].throughput


def test_each_key_is_fitted_apart_and_rounds_are_counted_per_ticket(monkeypatch) -> None:
    costs = CostModel(max_batch=32)
    for rows in (1, 2, 4):  # key "four" (4 experts) steps 1.6x slower than key "two"
        tickets = run_slice(monkeypatch, costs, [("two", rows, 3, 5, 1.0), ("four", rows, 3, 5, 1.6)])
    assert [t.rounds for t in tickets] == [5] * 8
    assert costs.decode.fit("two").coefficients() == pytest.approx((A, B))
    assert costs.decode.fit("four").coefficients() == pytest.approx((1.6 * A, 1.6 * B))
    assert costs.decode.fit("unseen") is costs.decode.all  # a key without its own samples: the fit over all
    assert costs.decode.fit("four").samples == 15
    assert costs.decode.fit("four").sums["w"] == pytest.approx(sum((1 - 1 / 32) ** i for i in range(15)))


def test_an_unidentified_fit_never_underestimates_steps_or_rows() -> None:
    f = KeyedFit()
    for _ in range(5):
        f.add("k", 1, 1, 2.0)  # only ever one row in one batch step: a and b cannot be told apart
    assert f.fit("k").coefficients() is None
    assert f.seconds("k", 1, 4) == pytest.approx(8.0) and f.seconds("k", 3, 3) == pytest.approx(6.0)
    f.add("k", 1, 1, 4.0)  # weights decay per sample: the newer sample counts more than the mean
    assert 2.0 + 2.0 / 6 < f.seconds("k", 1, 1) < 4.0


def planted(max_batch: int) -> CostModel:
    c = CostModel(max_batch=max_batch)
    for r, tokens in ((1, 5), (3, 200), (4, 40), (8, 90)):
        c.observe_step("x", r, A + B * r)
        c.observe_prefill("x", r, tokens, A_P * r + S_P * tokens)
    return c


def test_prediction_groups_keys_caps_batches_and_stops_rows_at_their_deadline() -> None:
    c = planted(max_batch=4)
    # key x: 6 rows of 10 rounds at most 4 at a time -> max(10, ceil(60 / 4)) = 15 steps; key y: 1 row of 3
    # steps, prompt 50 not prefilled yet (y has no fits of its own: the fits over all keys)
    rows = [RowWork("x", 0, 10) for _ in range(6)] + [RowWork("y", 50, 3)]
    assert c.predict(rows) == pytest.approx(A_P + 50 * S_P + A * (15 + 3) + B * (60 + 3))
    # rounds already done count off; a row stops at its deadline: 7 s left / t(1, 1) = 0.75 s -> 9 rounds
    assert c.predict([RowWork("x", 0, 10, rounds_done=4)]) == pytest.approx(6 * (A + B))
    assert c.predict([RowWork("x", 0, 1000, time_left_s=7.0)]) == pytest.approx(9 * (A + B))
    # a row not routed yet joins the key with the most rounds, its cheapest place: x, ceil(63 / 4) = 16 steps
    # (one more), where a key of its own would add 3 batch steps
    unrouted = c.predict([*rows, RowWork(None, 0, 3)])
    assert unrouted == pytest.approx(c.predict(rows) + A * (16 - 15) + 3 * B)
    assert unrouted < c.predict([*rows, RowWork("z", 0, 3)]) == pytest.approx(c.predict(rows) + 3 * (A + B))
    # a pipeline that steps twice per answer token (drafts, then the answer) doubles the rounds
    c.observe_row(rounds=40, tokens=20)
    assert c.rounds_per_token == pytest.approx(2.0)
    assert c.predict([RowWork("x", 0, 10)]) == pytest.approx(20 * (A + B))


def admission(**kw) -> Admission:
    adm = Admission(Limits(**{"generation_timeout_s": 100, "admit_fraction": 0.5, "max_batch": 4,
                              "token_budget": 10_000, "max_request_share": 0.5, **kw}))
    adm.costs = planted(max_batch=4)
    return adm


def test_a_backlog_predicted_past_the_deadline_is_refused_with_retry_after_from_the_prediction() -> None:
    adm = admission()
    live = [RowWork("x", 0, 40), RowWork("x", 0, 40)]  # T_B = 0.5 x 40 + 0.25 x 80 = 40 s
    assert adm.costs.predict(live) == pytest.approx(40.0)
    other = [RowWork("y", 10, 20)]  # another expert set: its own 20 batch steps -> T = 40 + 0.11 + 10 + 5
    with pytest.raises(Refused) as e:
        adm.check(30, backlog=80, live=live, request=other)
    t = 40 + A_P + 10 * S_P + 20 * (A + B)
    assert adm.costs.predict(live + other) == pytest.approx(t)
    assert e.value.code == "server_busy" and e.value.retry_after == math.ceil(t - 50)
    assert f"{t:.1f} s" in str(e.value)
    adm.check(30, backlog=80, live=live, request=[RowWork("x", 10, 20)])  # shares key x's steps: T = 45.11 s
    adm.check(5_000, backlog=0, live=[], request=[RowWork("y", 10, 4990)])  # idle: any request within the share
    with pytest.raises(Refused) as e:
        adm.check(5_001, backlog=0, live=[], request=[])
    assert e.value.code == "request_over_share" and e.value.retry_after is None
    with pytest.raises(Refused) as e:  # over the token budget: the excess drains at the predicted pace
        adm.check(2_000, backlog=9_000, live=live, request=[RowWork("x", 0, 1)])
    assert e.value.retry_after == math.ceil(40.0 * 1_000 / 9_000)


def test_before_any_step_is_timed_one_batch_of_default_requests_is_admitted() -> None:
    lim = Limits(max_batch=4, default_max_tokens=64, token_budget=10_000, max_request_share=0.5)
    adm = Admission(lim)
    adm.check(200, backlog=50, live=[RowWork("A", 0, 50)], request=[RowWork("A", 0, 200)])  # 250 <= 4 x 64
    with pytest.raises(Refused) as e:
        adm.check(300, backlog=100, live=[RowWork("A", 0, 100)], request=[RowWork("A", 0, 300)])
    assert e.value.code == "server_busy" and e.value.retry_after == lim.retry_after_s
