"""Continuous batching of the pipeline (:meth:`System.open_session`) on the tiny real system: rows of a
later call join the running draft / fusion / ensemble decodes between steps, each joined row's
answer (and drafts, cross-talk turns) equals its solo :meth:`System.generate` run, greedy and seeded
sampling; a later call's first answer token comes before a long call ends, counted in decode
steps; cancelling or dropping one joined row leaves the others exactly as they were; and the
decode session under it equals ``generate_rows`` on each row alone."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import taskmoe
from pipeline_helpers import prompts, variant
from taskmoe.inference.generate import GenerationConfig, generate_rows
from taskmoe.inference.pipeline import System
from taskmoe.inference.session import DecodeSession
from taskmoe.inference.stages import Control


def _prompts() -> list[str]:
    p = prompts()
    return [p["code"], p["legal"], p["chat"], p["legal"][:30] + " " + p["chat"][:30]]


@pytest.fixture(scope="module")
def system(run) -> System:
    return taskmoe.load(run)


@pytest.fixture(scope="module")
def talky(run, tmp_path_factory) -> System:
    """Every category selected and the top pair flagged on every prompt: cross-talk runs."""
    return taskmoe.load(variant(run, tmp_path_factory.mktemp("talky"), thresholds={"t_C_base": 0.0, "k": 4.0, "t_CT": 1.0}))


@pytest.fixture(scope="module")
def experts_only(run, tmp_path_factory) -> System:
    return taskmoe.load(variant(run, tmp_path_factory.mktemp("ens"), summarizer=None, adapters={},
                                thresholds={"t_C_base": 0.0, "k": 4.0, "t_CT": 0.0}))


class Joined:
    """Drive one session: call A starts, call B joins after ``join_at`` steps; record every answer
    token with the step it came in, and the step each row was done."""

    def __init__(self, system: System) -> None:
        self.system, self.session = system, system.open_session()
        self.first: dict[tuple[str, int], int] = {}
        self.done_at: dict[tuple[str, int], int] = {}
        self.answers: dict[tuple[str, int], tuple[list[int], object]] = {}
        self.calls: dict[int, str] = {}
        self.controls: dict[str, list[Control]] = {}
        self.cancel_at: dict[tuple[str, int], int] = {}
        self.answer_tokens: dict[tuple[str, int], int] = defaultdict(int)

    def add(self, name: str, texts: list[str], options: list[dict]) -> list:
        s = self.system
        self.controls[name] = [Control() for _ in texts]

        def on_token(i, tok, stage, expert):
            if stage == "answer":
                self.first.setdefault((name, i), self.session.steps)
                self.answer_tokens[(name, i)] += 1
                if self.answer_tokens[(name, i)] == self.cancel_at.get((name, i)):
                    self.controls[name][i].cancel()

        rows, call = s.call_rows([s.encode(t) for t in texts], options=options, controls=self.controls[name],
                                 on_token=on_token)
        self.calls[id(call)] = name
        self.session.add(rows, call)
        return rows

    def collect(self, done) -> None:
        for r, call in done:
            key = (self.calls[id(call)], r.index)
            self.done_at[key] = self.session.steps
            self.answers[key] = self.system.results([r], call)[0]

    def steps(self, n: int | None = None) -> None:
        while len(self.session) and (n is None or n > 0):
            self.collect(self.session.step())
            n = None if n is None else n - 1


def _check_solo(system: System, texts: list[str], options: list[dict], got: dict, name: str) -> None:
    for i, (t, o) in enumerate(zip(texts, options)):
        solo = system.generate(t, **o)
        ids, tr = got[(name, i)]
        assert ids == solo.ids, (name, i)
        assert [d.text for d in tr.drafts] == [d.text for d in solo.trace.drafts]
        assert tr.clarify == solo.trace.clarify and tr.adapter == solo.trace.adapter
        assert (tr.crosstalk or {}).get("turns") == (solo.trace.crosstalk or {}).get("turns")


@pytest.mark.parametrize("which", ["system", "talky", "experts_only"])
def test_rows_joining_mid_decode_equal_their_solo_runs(which, request) -> None:
    system: System = request.getfixturevalue(which)
    p = _prompts()
    a_texts, a_opts = [p[0], p[1]], [{"max_new_tokens": 30}, {"max_new_tokens": 30, "temperature": 1.0, "seed": 3}]
    b_texts = [p[1], p[3], p[2], p[0]]
    b_opts = [{"max_new_tokens": 10}, {"max_new_tokens": 12, "temperature": 0.9, "seed": 4}, {"max_new_tokens": 8},
              {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.8, "seed": 9}]
    j = Joined(system)
    j.add("A", a_texts, a_opts)
    j.steps(3)  # A is decoding (drafts done for some rows, answers under way)
    j.add("B", b_texts, b_opts)
    j.steps()
    assert len(j.answers) == 6 and len(j.session) == 0
    _check_solo(system, a_texts, a_opts, j.answers, "A")
    _check_solo(system, b_texts, b_opts, j.answers, "B")
    assert j.answers[("B", 0)][1].batch_size == 4  # a row's trace names its own call's size


def test_a_later_call_is_answered_before_a_long_call_ends(system) -> None:
    """Counted in decode steps (deterministic): the short call joins a long one that is already
    writing its answer, gets its first answer token within its own drafting steps (draft_tokens =
    8) plus one, and is done while the long call still decodes."""
    p = _prompts()
    j = Joined(system)
    j.add("long", [p[0]], [{"max_new_tokens": 60}])
    while ("long", 0) not in j.first:
        j.steps(1)
    joined_at = j.session.steps
    j.add("short", [p[1]], [{"max_new_tokens": 3}])
    j.steps()
    assert len(j.answers[("long", 0)][0]) == 60  # long enough that the test can fail
    assert j.first[("short", 0)] - joined_at <= system.config.draft_tokens + 1
    assert j.done_at[("short", 0)] < j.done_at[("long", 0)] - 40
    _check_solo(system, [p[1]], [{"max_new_tokens": 3}], j.answers, "short")


@pytest.mark.parametrize("which", ["system", "experts_only"])
def test_cancelling_or_dropping_one_joined_row_leaves_the_others_exact(which, request) -> None:
    system: System = request.getfixturevalue(which)
    p = _prompts()
    opts = [{"max_new_tokens": 20}, {"max_new_tokens": 20, "temperature": 1.0, "seed": 5}, {"max_new_tokens": 20}]
    j = Joined(system)
    j.add("A", [p[0], p[1]], opts[:2])
    j.steps(2)
    j.cancel_at[("B", 0)] = 2  # B's first row: cancelled at its second answer token
    rows_b = j.add("B", [p[1], p[0]], [opts[1], opts[2]])
    j.add("C", [p[0]], [opts[0]])
    j.steps(12)
    j.collect(j.session.drop([rows_b[1]]))  # B's second row: dropped from outside (client gone)
    j.steps()
    ids, tr = j.answers[("B", 0)]
    assert len(ids) == 2 and tr.stopped == {"reason": "cancelled", "stage": "answer"}
    ids, tr = j.answers[("B", 1)]
    assert tr.stopped is not None and tr.stopped["reason"] == "cancelled"
    assert ids == system.generate(p[0], **opts[2]).ids[: len(ids)]
    _check_solo(system, [p[0], p[1]], opts[:2], j.answers, "A")
    _check_solo(system, [p[0]], [opts[0]], j.answers, "C")


def test_decode_session_rows_equal_each_row_alone(system) -> None:
    """The session under the stages: rows joining later (other lengths, their own seeds), a row with
    nothing to decode, and a dropped row; every row equals ``generate_rows`` on it alone, and a
    step is one forward for every live row."""
    model = system.store.get(sorted(system.store.names)[0])
    calls = [0]
    hook = model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    try:
        tok = system.tokenizer
        ids = [[tok.bos_id, *system.encode(t)] for t in _prompts()]
        cfgs = [GenerationConfig(max_new_tokens=9, temperature=0.0), GenerationConfig(max_new_tokens=7, temperature=1.0, seed=1),
                GenerationConfig(max_new_tokens=0), GenerationConfig(max_new_tokens=8, temperature=0.8, top_k=5, seed=2)]
        s = DecodeSession(model)
        got = {}
        first = s.add(ids[:2], cfgs[:2])
        for _ in range(3):
            got.update(s.step())
        later = s.add(ids[2:], cfgs[2:])
        n0, steps = calls[0], 0
        while len(s):
            got.update(s.step())
            steps += 1
        assert calls[0] - n0 <= steps  # one forward per step for all live rows together
        for h, p, c in zip(first + later, ids, cfgs):
            assert got[h].tokens == generate_rows(model, [p], [c])[0].tokens and got[h].finish == generate_rows(model, [p], [c])[0].finish
        (h,) = s.add(ids[:1], cfgs[:1])
        s.step()
        n = calls[0]
        (gone,) = s.drop([h])
        assert gone[1].finish == "halted" and len(gone[1].tokens) == 1 and len(s) == 0 and s.step() == [] and calls[0] == n
    finally:
        hook.remove()
    assert torch.is_grad_enabled()


def test_session_api_is_pinned() -> None:
    """The server's IMoE backend builds on these names and keyword arguments."""
    import inspect

    import taskmoe.inference.stages as S

    assert "PipelineSession" in S.__all__
    assert {"controls", "on_token", "options", "gen"} <= set(inspect.signature(System.call_rows).parameters)
    assert list(inspect.signature(System.results).parameters) == ["self", "rows", "call"]
    for stage in (S.Draft, S.Fuse, S.Ensemble):
        assert callable(getattr(stage, "open", None)) and callable(getattr(stage, "inputs", None))
