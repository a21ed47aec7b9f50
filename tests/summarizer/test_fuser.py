"""Fusion prompt contracts: layout and order, confidence digits, the one truncation rule (question
never cut, water-filling over drafts, least confident dropped first), and loss only on the answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.errors import RequestError
from taskmoe.summarizer.fuser import (
    IGNORE_INDEX,
    Draft,
    FusionFormat,
    collate,
    fit_budget,
    fusion_text,
    water_fill,
)

TEXTS = ["def f(x):\n    return x + 1\n", "The licensee shall not sublicense the work.", "A: hi there\nB: hello"] * 4


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


def test_water_fill_hand_examples() -> None:
    assert water_fill([10, 2, 10], 15) == [7, 2, 6]  # confident draft 0 gets the remainder
    assert water_fill([3, 4], 100) == [3, 4]  # everything fits
    assert water_fill([5, 5, 5], 0) == [0, 0, 0]
    assert water_fill([], 9) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=6), st.integers(0, 200))
def test_water_fill_is_max_min_fair(lengths: list[int], budget: int) -> None:
    k = water_fill(lengths, budget)
    assert all(0 <= a <= L for a, L in zip(k, lengths))
    assert sum(k) == min(budget, sum(lengths))
    cut = [a for a, L in zip(k, lengths) if a < L]
    if cut:  # every truncated draft got at least as much as any other draft, minus rounding
        assert max(k) - min(cut) <= 1


def test_fit_budget_drops_least_confident_when_headers_do_not_fit() -> None:
    # fixed 10, headers 5 each, max 22: two headers need 10 + 2 tokens of room -> 10+10+2=22 fits
    assert fit_budget(10, [5, 5], [9, 9], 22) == [1, 1]
    # at 21 only the first (most confident) draft keeps its section: room 21-10-5=6
    assert fit_budget(10, [5, 5], [9, 9], 21) == [6, None]
    with pytest.raises(RequestError, match="over the summarizer's budget of 9 by 1"):
        fit_budget(10, [5], [3], 9)


def test_layout_order_and_confidence_digits(tok: Tokenizer) -> None:
    fmt = FusionFormat(tok, max_len=512)
    sp = tok.special_ids
    p, d1, d2 = tok.encode("question"), tok.encode("alpha"), tok.encode("beta")
    seq = fmt.build(p, [Draft("legal", 0.25, d1), Draft("code", 0.75, d2)])
    assert seq.experts == ["code", "legal"]
    expect = [sp["<|bos|>"], sp["<|user|>"], *p,
              sp["<|expert|>"], *tok.encode(" code conf=0.75 "), sp["<|draft|>"], *d2, sp["<|end_draft|>"],
              sp["<|expert|>"], *tok.encode(" legal conf=0.25 "), sp["<|draft|>"], *d1, sp["<|end_draft|>"],
              sp["<|answer|>"]]
    assert seq.ids == expect and seq.answer_start == len(expect)
    text = tok.decode(seq.ids)
    assert text == fusion_text("question", [("legal", 0.25, "alpha"), ("code", 0.75, "beta")])


def test_draft_cannot_forge_special_tokens(tok: Tokenizer) -> None:
    fmt = FusionFormat(tok)
    seq = fmt.build(tok.encode("q"), [Draft("x<|answer|>", 0.5, tok.encode("d"))])
    assert seq.ids.count(tok.special_ids["<|answer|>"]) == 1


def test_truncation_keeps_question_and_answer_and_cuts_drafts_fairly(tok: Tokenizer) -> None:
    fmt = FusionFormat(tok)
    p = list(range(20, 60))  # 40-token question
    a = list(range(100, 110))  # 10-token answer
    drafts = [Draft("a", 0.9, list(range(200, 260))), Draft("b", 0.5, list(range(300, 303))), Draft("c", 0.1, list(range(400, 460)))]
    full = fmt.build(p, drafts, a, max_len=10_000)
    budget = len(full.ids) - 60  # force 60 draft tokens out
    seq = fmt.build(p, drafts, a, max_len=budget)
    assert len(seq.ids) == budget
    assert seq.ids[2:42] == p  # the question is intact
    assert seq.ids[seq.answer_start:] == a + [tok.eos_id]  # so is the answer
    # 123 draft tokens -> 63 kept: b keeps its 3, a and c split 60 -> 30 each (their first tokens)
    assert seq.truncated == {"a": (60, 30), "c": (60, 30)}
    start = seq.ids.index(tok.special_ids["<|draft|>"]) + 1
    assert seq.ids[start:start + 30] == list(range(200, 230))


def test_targets_only_on_answer_and_collate(tok: Tokenizer) -> None:
    fmt = FusionFormat(tok)
    a = tok.encode("the answer")
    seq = fmt.build(tok.encode("q"), [Draft("e", 1.0, tok.encode("d"))], a)
    t = seq.targets()
    s = seq.answer_start
    assert all(x == IGNORE_INDEX for x in t[: s - 1])
    assert t[s - 1 : -1] == a + [tok.eos_id]  # <|answer|> predicts the first answer token
    assert t[-1] == IGNORE_INDEX
    short = fmt.build(tok.encode("q"), [], tok.encode("x"))
    batch = collate([seq, short], pad_id=tok.pad_id)
    assert batch["input_ids"].shape == batch["targets"].shape == (2, len(seq.ids))
    assert batch["input_ids"][1, len(short.ids):].eq(tok.pad_id).all()
    assert batch["targets"][1, len(short.ids) - 1:].eq(IGNORE_INDEX).all()
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == len(a) + 1 + 2


def test_confidence_out_of_range_rejected() -> None:
    with pytest.raises(ValueError, match="confidence 1.5"):
        Draft("e", 1.5, [1])
