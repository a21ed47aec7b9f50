"""The pipeline's stages under control, on the tiny real system (pipeline_helpers): a cancelled row
stops consuming decode steps within one step in every stage (drafting, cross-talk, fusion, the
ensemble), a past deadline stops a row before any work, tokens stream in stage order, the stream
iterator matches the batch, sampled rows with different seeds share a batch and each equals its solo
run, and the experts-only mode says in the trace that it does not talk a pair out."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import torch

import taskmoe
from pipeline_helpers import prompts, variant
from taskmoe.errors import RequestError
from taskmoe.inference.pipeline import System
from taskmoe.inference.stages import Control, Row
from taskmoe.inference.stages.ensemble import ENSEMBLE_CROSSTALK
from taskmoe.inference.stream import TokenEvent

ROW = 1  # the row that gets cancelled


def _prompts() -> list[str]:
    p = prompts()
    return [p["code"], p["legal"], p["chat"], p["legal"][:30] + " " + p["chat"][:30]]


@pytest.fixture(scope="module")
def talky(run, tmp_path_factory) -> System:
    """Every category selected (t_C_base = 0) and the top pair flagged on every prompt (t_CT = 1)."""
    return taskmoe.load(variant(run, tmp_path_factory.mktemp("talky"), thresholds={"t_C_base": 0.0, "k": 4.0, "t_CT": 1.0}))


@pytest.fixture(scope="module")
def experts_only(run, tmp_path_factory) -> System:
    folder = variant(run, tmp_path_factory.mktemp("ens"), summarizer=None, adapters={},
                     thresholds={"t_C_base": 0.0, "k": 4.0, "t_CT": 1.0})
    return taskmoe.load(folder)


class Steps:
    """Rows read by one-token (decode) forwards of every expert and the summarizer."""

    def __init__(self, system: System) -> None:
        models = [system.store.get(n) for n in sorted(set(system.expert_of.values()))]
        if system.summarizer is not None:
            models.append(system.summarizer)
        self.rows = 0
        self.hooks = [m.register_forward_pre_hook(self._hook) for m in models]

    def _hook(self, module, args) -> None:
        if args[0].shape[1] == 1:
            self.rows += args[0].shape[0]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _run(system: System, cancel: tuple[str, int] | None = None):
    """Answer the batch; with ``cancel = (stage, k)``, row ROW is cancelled at its k-th token of ``stage``.
    Returns (answers, events per row, decode row-steps)."""
    events: dict[int, list[TokenEvent]] = defaultdict(list)
    controls = [Control() for _ in _prompts()]

    def on_token(row, token, stage, expert):
        events[row].append(TokenEvent(row, token, stage, expert))
        if cancel and row == ROW and sum(e.stage == cancel[0] for e in events[row]) == cancel[1]:
            controls[row].cancel()

    steps = Steps(system)
    try:
        answers = system.generate_batch(_prompts(), controls=controls, on_token=on_token)
    finally:
        steps.close()
    return answers, events, steps.rows


@pytest.mark.parametrize("mode,stage,readers", [("summarizer", "draft", 1), ("summarizer", "crosstalk", 2),
                                                ("summarizer", "answer", 1), ("ensemble", "answer", None)])
def test_a_cancelled_row_stops_within_one_step_in_every_stage(talky, experts_only, mode, stage, readers) -> None:
    system = talky if mode == "summarizer" else experts_only
    full, full_ev, full_steps = _run(system)
    assert sum(e.stage == stage for e in full_ev[ROW]) >= 4, "the row must be long enough in this stage to cut it"
    k = 2
    cut, cut_ev, cut_steps = _run(system, (stage, k))
    cut_more, _, more_steps = _run(system, (stage, k + 1))
    mine = cut_ev[ROW]
    at = next(i for i, e in enumerate(mine) if e.stage == stage and sum(x.stage == stage for x in mine[: i + 1]) == k)
    assert mine[: at + 1] == full_ev[ROW][: at + 1] and len(mine) == at + 1  # nothing after the cancelling token
    assert cut[ROW].trace.stopped == {"reason": "cancelled", "stage": stage}
    assert cut_more[ROW].trace.stopped == {"reason": "cancelled", "stage": stage}
    for i in range(len(full)):  # the other rows do not notice
        if i != ROW:
            assert cut[i].ids == full[i].ids and cut_ev[i] == full_ev[i] and cut[i].trace.stopped is None
    # each token produced after the cancel point would cost one decode step per model reading the row:
    # one for a draft or an answer, two in a dialogue (both speakers read), one per expert in the ensemble
    n = readers if readers is not None else len(full[ROW].trace.routing["selected"])
    assert more_steps - cut_steps == n and cut_steps < full_steps


def test_a_past_deadline_stops_a_row_before_any_work(talky) -> None:
    events: list[tuple[int, str]] = []
    controls = [Control(), Control(deadline=time.monotonic() - 1.0), Control(), Control()]
    out = talky.generate_batch(_prompts(), controls=controls, on_token=lambda r, t, s, e: events.append((r, s)))
    tr = out[ROW].trace
    assert tr.stopped == {"reason": "deadline", "stage": "route"} and out[ROW].ids == [] and tr.drafts == []
    assert all(r != ROW for r, _ in events) and out[0].ids == talky.generate(_prompts()[0]).ids


def test_tokens_stream_in_stage_order_and_the_stream_matches_the_batch(talky) -> None:
    batch = talky.generate_batch(_prompts())
    stream = talky.stream(_prompts())
    events = list(stream)
    answers = stream.answers
    assert [a.ids for a in answers] == [b.ids for b in batch] and [a.text for a in answers] == [b.text for b in batch]
    order = {"draft": 0, "crosstalk": 1, "answer": 2, "clarification": 2}
    for i, a in enumerate(answers):
        mine = [e for e in events if e.row == i]
        assert [order[e.stage] for e in mine] == sorted(order[e.stage] for e in mine)
        if a.trace.clarify:
            assert [e.token for e in mine if e.stage == "clarification"] == talky.tokenizer.encode(a.text, allow_special=False)
        else:
            assert [e.token for e in mine if e.stage == "answer"] == a.ids
        assert {e.expert for e in mine if e.stage == "draft"} == {d.expert for d in a.trace.drafts}
        assert {e.expert for e in mine if e.stage == "crosstalk"} <= set(a.trace.crosstalk["pair"])


def test_leaving_a_stream_early_cancels_every_row(talky) -> None:
    stream = talky.stream(_prompts())
    for first in stream:
        break  # leaving the loop cancels the call and waits for it
    assert first.stage == "draft"
    assert all(a.trace.stopped is not None and a.trace.stopped["reason"] == "cancelled" for a in stream.answers)
    with talky.stream(_prompts()) as s:
        next(iter(s))
    assert all(a.trace.stopped is not None for a in s.answers)


def test_rows_with_different_seeds_share_a_batch_and_each_equals_alone(run, talky) -> None:
    system = taskmoe.load(run)
    ps = [_prompts()[0]] * 3 + [_prompts()[1]]
    opts = [{"seed": 11}, {"seed": 12}, {"seed": 13}, {"seed": 11, "max_new_tokens": 5}]
    batch = system.generate_batch(ps, temperature=1.0, options=opts)
    for p, o, b in zip(ps, opts, batch):
        assert b.ids == system.generate(p, temperature=1.0, **o).ids and not b.trace.clarify
    assert len({tuple(b.ids) for b in batch[:3]}) >= 2  # the seeds matter, so the test can fail
    # sampled cross-talk dialogues too: each row's transcript is the one it gets alone
    for p, b in zip(_prompts(), talky.generate_batch(_prompts(), temperature=1.0, options=[{"seed": 5}] * 4)):
        alone = talky.generate(p, temperature=1.0, seed=5)
        assert b.ids == alone.ids and b.trace.crosstalk["turns"] == alone.trace.crosstalk["turns"]
    assert len(batch[3].ids) <= 5
    with pytest.raises(RequestError, match="unknown generation option"):
        system.generate_batch(ps[:1], options=[{"temp": 1.0}])
    with pytest.raises(RequestError, match="one entry per prompt"):
        system.generate_batch(ps, options=opts[:2])


def test_experts_only_mode_says_it_does_not_talk_a_pair_out(experts_only) -> None:
    tr = experts_only.generate(_prompts()[0]).trace
    ct = tr.crosstalk
    assert ct["ran"] is False and ct["reason"] == ENSEMBLE_CROSSTALK and ct["turns"] == []
    assert {experts_only.expert_of[c] for c in ct["categories"]} == set(ct["pair"])
    assert set(ct["categories"]) <= set(tr.routing["selected_names"])


def test_stages_keep_their_rows_and_skip_stopped_ones(talky) -> None:
    """The batched interface: each stage returns the same Row objects in order, leaving stopped rows alone."""
    from taskmoe.inference.pipeline import PipelineConfig
    from taskmoe.inference.stages import Call, RecordingStore
    from taskmoe.inference.trace import Trace

    ids = [talky.encode(p) for p in _prompts()]
    rows = [Row(i, p, talky.config, Trace("", len(p), "summarizer", {})) for i, p in enumerate(ids)]
    rows[ROW].control.cancel()
    call = Call(talky.config, RecordingStore(talky.store))
    out = rows
    for stage in talky.stages():
        out = stage(out, call)
        assert out is rows or [id(r) for r in out] == [id(r) for r in rows]
    assert rows[ROW].decision is None and rows[ROW].drafts == [] and rows[ROW].answer == []
    assert all(r.decision is not None for i, r in enumerate(rows) if i != ROW)
    assert isinstance(talky.config, PipelineConfig) and [s.name for s in talky.stages()] == [
        "route", "draft", "crosstalk", "assess", "fuse"]
    assert torch.is_tensor(talky.features([ids[0]]))


def test_public_api_is_pinned() -> None:
    """Serving and the CLI build on these names and keyword arguments."""
    import inspect

    import taskmoe.inference.stages as S

    assert set(S.__all__) >= {"Route", "Draft", "Crosstalk", "Assess", "Fuse", "Ensemble", "Row", "Control", "Call"}
    sig = inspect.signature(System.generate_ids).parameters
    assert list(sig)[:2] == ["self", "prompts"] and {"controls", "on_token", "options", "gen"} <= set(sig)
    assert {"controls", "on_token", "options"} <= set(inspect.signature(System.generate_batch).parameters)
    assert {"controls", "options"} <= set(inspect.signature(System.stream).parameters)
    assert list(inspect.signature(Control).parameters)[:2] == ["deadline", "is_cancelled"]
    assert [f for f in TokenEvent.__dataclass_fields__] == ["row", "token", "stage", "expert"]
