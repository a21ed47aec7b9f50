"""Admission by work in seconds: the measured rates (fake clocks, planted costs), the prediction, the rule.

Every number is planted: rounds and joins advance a fake clock by a known ``a x batches + b x rows``
and ``s_p x prompt tokens``, so the fitted rates and every prediction are checked exactly.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest

from taskmoe.serving import scheduler as scheduler_module
from taskmoe.serving.admission import Admission, Refused, RowWork
from taskmoe.serving.costs import CostModel
from taskmoe.serving.limits import Limits
from taskmoe.serving.metrics import ServerMetrics

A, B, S_P = 0.5, 0.25, 0.001  # planted: s per batch step, s per row in a step, s per prompt token


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class FakeBatch:
    """A step batch whose join costs S_P per prompt token and whose step costs A + B x rows, on the fake clock."""

    def __init__(self, clock: Clock, steps: int) -> None:
        self.clock, self.steps, self.rows = clock, steps, {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows) -> list[int]:
        self.clock.now += S_P * sum(len(r.prompt_ids) for r in rows)
        handles = list(range(len(self.rows), len(self.rows) + len(rows)))
        self.rows.update({h: 0 for h in handles})
        return handles

    def drop(self, handles):
        return []

    def step(self):
        self.clock.now += A + B * len(self.rows)
        for h in list(self.rows):
            self.rows[h] += 1
            if self.rows[h] >= self.steps:
                del self.rows[h]
        return []


def ticket(prompt: int) -> SimpleNamespace:
    return SimpleNamespace(row=SimpleNamespace(prompt_ids=[1] * prompt), alive=lambda: True, rounds=0)


def run_slice(monkeypatch, costs: CostModel, plan: list[tuple[int, int, int]]) -> None:
    """One decode slice of batches given as (rows, prompt tokens per row, steps); SLICE_S is wide open."""
    clock = Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    monkeypatch.setattr(scheduler_module, "SLICE_S", math.inf)
    runs = [scheduler_module._Running(None, FakeBatch(clock, steps)) for _, _, steps in plan]
    joins = [(run, [ticket(p) for _ in range(rows)]) for run, (rows, p, _) in zip(runs, plan)]
    errors = scheduler_module._decode_slice(runs, joins, [], threading.Event(), lambda *_: None, ServerMetrics(),
                                            costs)
    assert not errors


def test_prefill_heavy_join_does_not_inflate_the_decode_estimate(monkeypatch) -> None:
    light, heavy = CostModel(max_batch=32), CostModel(max_batch=32)
    run_slice(monkeypatch, light, [(2, 4, 6), (1, 4, 3)])  # 2 keys: rounds of (2 batches, 3 rows), (1, 2)
    run_slice(monkeypatch, heavy, [(2, 4000, 6), (1, 4000, 3)])  # the same decode, 1000x the prompt tokens
    for c in (light, heavy):
        assert c.prefill_s_per_token == pytest.approx(S_P)
        assert c.rounds.coefficients() == pytest.approx((A, B))  # decode rounds fit alone, prefill apart
    row = [RowWork("k", 0, 10)]
    assert heavy.predict(row) == light.predict(row) == pytest.approx(10 * (A + B))
    # the old single rate (work tokens per busy second) is what a prefill spike inflates
    old = {name: Admission(Limits()) for name in ("light", "heavy")}
    for name, prompt in (("light", 4), ("heavy", 4000)):
        decode_s = 3 * (A + 3 * B) + 3 * (A + 2 * B)
        old[name].observe(tokens=3 * prompt + 2 * 6 + 3, seconds=3 * prompt * S_P + decode_s)
    assert old["heavy"].throughput > 10 * old["light"].throughput


def test_rounds_and_rows_are_timed_per_round_and_counted_per_ticket(monkeypatch) -> None:
    costs = CostModel(max_batch=32)
    clock = Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    monkeypatch.setattr(scheduler_module, "SLICE_S", math.inf)
    run = scheduler_module._Running(None, FakeBatch(clock, 5))
    ts = [ticket(3), ticket(3)]
    scheduler_module._decode_slice([run], [(run, ts)], [], threading.Event(), lambda *_: None, ServerMetrics(), costs)
    assert [t.rounds for t in ts] == [5, 5] and clock.now == pytest.approx(6 * S_P + 5 * (A + 2 * B))
    assert costs.rounds.sums["w"] == pytest.approx(sum((1 - 1 / 32) ** i for i in range(5)))


def test_an_unidentified_fit_never_underestimates_batches_or_rows() -> None:
    c = CostModel(max_batch=8)
    for _ in range(5):
        c.observe_round(1, 1, 2.0)  # only ever one row in one batch: a and b cannot be told apart
    assert c.rounds.coefficients() is None
    assert c.rounds.seconds(1, 4) == pytest.approx(8.0) and c.rounds.seconds(3, 3) == pytest.approx(6.0)
    c.observe_round(1, 1, 4.0)  # weights decay per sample: the newer sample counts more
    assert 2.0 + 2.0 / 6 < c.rounds.seconds(1, 1) < 4.0


def test_prediction_groups_keys_caps_batches_and_stops_rows_at_their_deadline() -> None:
    c = CostModel(max_batch=4)
    for g, r in ((1, 1), (2, 3), (1, 4), (3, 8)):
        c.observe_round(g, r, A * g + B * r)
    c.observe_prefill(1000, 1000 * S_P)
    assert c.rounds.coefficients() == pytest.approx((A, B))
    # key x: 6 rows of 10 rounds at most 4 at a time -> max(10, ceil(60 / 4)) = 15 rounds; key y: 1 row of 3
    rows = [RowWork("x", 0, 10) for _ in range(6)] + [RowWork("y", 50, 3)]
    assert c.predict(rows) == pytest.approx(50 * S_P + A * (15 + 3) + B * (60 + 3))
    # rounds already done count off; a row stops at its deadline: 7 s left / t(1, 1) = 0.75 s -> 9 rounds
    assert c.predict([RowWork("x", 0, 10, rounds_done=4)]) == pytest.approx(6 * (A + B))
    assert c.predict([RowWork("x", 0, 1000, time_left_s=7.0)]) == pytest.approx(9 * (A + B))
    # a row not routed yet joins the key with the most rounds, its cheapest place: x, ceil(63 / 4) = 16 rounds
    # (one more batch step), where a key of its own would add 3 batch steps
    unrouted = c.predict([*rows, RowWork(None, 0, 3)])
    assert unrouted == pytest.approx(c.predict(rows) + A * (16 - 15) + 3 * B)
    assert unrouted < c.predict([*rows, RowWork("z", 0, 3)]) == pytest.approx(c.predict(rows) + 3 * (A + B))
    # a pipeline that steps twice per answer token (drafts, then the answer) doubles the rounds
    c.observe_row(rounds=40, tokens=20)
    assert c.rounds_per_token == pytest.approx(2.0)
    assert c.predict([RowWork("x", 0, 10)]) == pytest.approx(20 * (A + B))


def planted(limits: Limits) -> Admission:
    adm = Admission(limits)
    for g, r in ((1, 1), (2, 3), (1, 4), (3, 8)):
        adm.costs.observe_round(g, r, A * g + B * r)
    adm.costs.observe_prefill(100, 100 * 0.01)
    return adm


def test_a_backlog_predicted_past_the_deadline_is_refused_with_retry_after_from_the_prediction() -> None:
    lim = Limits(generation_timeout_s=100, admit_fraction=0.5, max_batch=4, token_budget=10_000, max_request_share=0.5)
    adm = planted(lim)
    live = [RowWork("A", 0, 40), RowWork("A", 0, 40)]  # T_B = 0.5 x 40 + 0.25 x 80 = 40 s
    assert adm.costs.predict(live) == pytest.approx(40.0)
    other = [RowWork("B", 10, 20)]  # another expert set: its own 20 batch steps, 0.1 + 10 + 5 -> T = 55.1 s
    with pytest.raises(Refused) as e:
        adm.check(30, backlog=80, live=live, request=other)
    assert adm.costs.predict(live + other) == pytest.approx(55.1)
    assert e.value.code == "server_busy" and e.value.retry_after == math.ceil(55.1 - 50)
    assert "55.1 s" in str(e.value)
    adm.check(30, backlog=80, live=live, request=[RowWork("A", 10, 20)])  # shares key A's steps: T = 45.1 s
    adm.check(5_000, backlog=0, live=[], request=[RowWork("B", 10, 4990)])  # idle: any request within the share
    with pytest.raises(Refused) as e:
        adm.check(5_001, backlog=0, live=[], request=[])
    assert e.value.code == "request_over_share" and e.value.retry_after is None
    with pytest.raises(Refused) as e:  # over the token budget: the excess drains at the predicted pace
        adm.check(2_000, backlog=9_000, live=live, request=[RowWork("A", 0, 1)])
    assert e.value.retry_after == math.ceil(40.0 * 1_000 / 9_000)


def test_before_any_round_is_timed_one_batch_of_default_requests_is_admitted() -> None:
    lim = Limits(max_batch=4, default_max_tokens=64, token_budget=10_000, max_request_share=0.5)
    adm = Admission(lim)
    adm.check(200, backlog=50, live=[RowWork("A", 0, 50)], request=[RowWork("A", 0, 200)])  # 250 <= 4 x 64
    with pytest.raises(Refused) as e:
        adm.check(300, backlog=100, live=[RowWork("A", 0, 100)], request=[RowWork("A", 0, 300)])
    assert e.value.code == "server_busy" and e.value.retry_after == lim.retry_after_s
