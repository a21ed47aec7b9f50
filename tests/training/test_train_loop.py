"""Contracts of the one train loop: exact resume, NaN safety, freezing, callbacks, max_steps."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from taskmoe.errors import TrainingError
from taskmoe.training.checkpoint import list_checkpoints, load_latest
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train
from train_helpers import AffineSequences, TinyLM, lm_loss


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=14, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=3, min_lr_ratio=0.1,
                eval_every=5, eval_batches=2, save_every=3, keep_last=2, log_every=1, progress=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


class Crash(Exception):
    pass


def _crash_on_call(n: int):
    """lm_loss that raises on its n-th *training* call (eval calls are not counted)."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == n:
                raise Crash(f"simulated crash on training call {n}")
        return lm_loss(model, batch)

    return loss_fn


def _metric_lines(path) -> list[dict]:
    drop = {"tokens_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def test_interrupted_and_resumed_run_reproduces_uninterrupted_run_exactly(tmp_path):
    # 38 samples, global batch 2*2 = 4 -> 9 steps per epoch (2 samples dropped), 14 steps cross into epoch 1.
    data, eval_data = AffineSequences(38, seed=0), AffineSequences(8, seed=1)
    cfg = _cfg()
    torch.manual_seed(0)
    ref_model = TinyLM()
    init = copy.deepcopy(ref_model.state_dict())
    ref = train(ref_model, lm_loss, data, cfg, eval_data=eval_data, out_dir=tmp_path / "ref")
    assert ref.steps == 14 and len(ref.losses) == 14
    assert ref.losses[-1] < ref.losses[0]  # it learns

    model = TinyLM()
    model.load_state_dict(init)
    # crash inside step 8 (calls 15, 16 are its two micro-batches): step 6 is the last checkpoint.
    with pytest.raises(Crash):
        train(model, _crash_on_call(16), data, cfg, eval_data=eval_data, out_dir=tmp_path / "run")
    ck = load_latest(tmp_path / "run")
    assert ck.step == 6
    assert (ck.trainer_state["epoch"], ck.trainer_state["index"]) == (0, 24)  # mid-epoch data position

    torch.manual_seed(123)  # a differently initialised model and a different global RNG state
    resumed_model = TinyLM()
    res = train(resumed_model, lm_loss, data, cfg, eval_data=eval_data, out_dir=tmp_path / "run")
    assert res.steps == 14
    assert res.losses == ref.losses  # exact, step by step
    assert res.eval_history == ref.eval_history
    assert [e["step"] for e in res.eval_history] == [5, 10, 14]
    for k, v in ref_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[k], v), k
    # metrics.jsonl reads as one uninterrupted run (lines written after step 6 by the crashed run dropped)
    assert _metric_lines(tmp_path / "run" / "metrics.jsonl") == _metric_lines(tmp_path / "ref" / "metrics.jsonl")
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [12, 14]  # keep_last=2


def test_max_steps_is_honoured_across_resume(tmp_path):
    data = AffineSequences(16)
    cfg = _cfg(max_steps=4, save_every=0, eval_every=0)
    first = train(TinyLM(), lm_loss, data, cfg, out_dir=tmp_path)
    again = train(TinyLM(), lm_loss, data, cfg, out_dir=tmp_path)  # already done: nothing to train
    assert again.steps == 4 and again.losses == first.losses
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    longer = train(TinyLM(), lm_loss, data, cfg.replace(max_steps=6), out_dir=tmp_path)
    assert longer.steps == 6 and longer.losses[:4] == first.losses and len(longer.losses) == 6


def test_resume_false_refuses_a_folder_with_checkpoints(tmp_path):
    data = AffineSequences(16)
    train(TinyLM(), lm_loss, data, _cfg(max_steps=2), out_dir=tmp_path)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(TinyLM(), lm_loss, data, _cfg(max_steps=2), out_dir=tmp_path, resume=False)


def _nan_at_step(k: int, grad_accum: int):
    calls = {"n": 0}

    def loss_fn(model, batch):
        loss, m = lm_loss(model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] > (k - 1) * grad_accum:  # every micro-batch of step k
                loss = loss * float("nan")
        return loss, m

    return loss_fn


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    data = AffineSequences(40)
    cfg = _cfg(max_steps=10, save_every=2, eval_every=0)
    model = TinyLM()
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 5") as ei:
        train(model, _nan_at_step(5, cfg.grad_accum), data, cfg, out_dir=tmp_path)
    assert "step-000004" in str(ei.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was never applied
    ck = load_latest(tmp_path)
    assert ck.step == 4 and [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    fresh = TinyLM()
    ck.load_model(fresh)
    for k, v in model.state_dict().items():  # model in memory == checkpoint 4 (step 5 never updated)
        assert torch.equal(fresh.state_dict()[k], v)
    # the run resumes cleanly from the last good checkpoint once the loss is fixed
    res = train(TinyLM(), lm_loss, data, cfg, out_dir=tmp_path)
    assert res.steps == 10 and all(math.isfinite(x) for x in res.losses)


def test_nan_gradient_with_finite_loss_is_caught(tmp_path):
    def loss_fn(model, batch):
        loss, m = lm_loss(model, batch)
        w = model.mlp.weight
        return loss + 0.0 * torch.sqrt((w - w.detach()).sum()), m  # value 0, gradient 0 * inf = nan

    with pytest.raises(TrainingError, match=r"non-finite gradient norm \(nan\) at step 1.*no checkpoint"):
        train(TinyLM(), loss_fn, AffineSequences(16), _cfg(max_steps=3), out_dir=tmp_path)
    assert list_checkpoints(tmp_path) == []


def test_frozen_parameters_stay_fixed_and_skip_the_optimizer():
    model = TinyLM()
    model.embed.weight.requires_grad_(False)
    before = model.embed.weight.detach().clone()
    mlp_before = model.mlp.weight.detach().clone()
    train(model, lm_loss, AffineSequences(16), _cfg(max_steps=3, weight_decay=0.5))
    assert torch.equal(model.embed.weight, before)
    assert not torch.equal(model.mlp.weight, mlp_before)


class StopAt:
    """Stops training at a step; counts steps seen, with that count checkpointed."""

    def __init__(self, stop: int | None) -> None:
        self.stop, self.seen, self.evals = stop, 0, []

    def on_step_end(self, step, record):
        self.seen += 1
        assert record["step"] == step and "loss" in record and "accuracy" in record
        return step == self.stop

    def on_eval(self, step, record):
        self.evals.append(step)

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, d):
        self.seen = d["seen"]


def test_callback_can_stop_and_its_state_is_checkpointed(tmp_path):
    data, ev = AffineSequences(24), AffineSequences(4, seed=3)
    cfg = _cfg(max_steps=8, save_every=0, eval_every=0)
    cb = StopAt(3)
    res = train(TinyLM(), lm_loss, data, cfg, eval_data=ev, out_dir=tmp_path, callbacks=[cb])
    assert res.stopped_early and res.steps == 3 and cb.seen == 3 and cb.evals == [3]
    assert res.checkpoint is not None and res.checkpoint.name == "step-000003"
    cb2 = StopAt(None)
    res2 = train(TinyLM(), lm_loss, data, cfg, eval_data=ev, out_dir=tmp_path, callbacks=[cb2])
    assert res2.steps == 8 and not res2.stopped_early and cb2.seen == 8  # 3 restored + 5 new
    assert [e["step"] for e in res2.eval_history] == [3, 8]


def test_eval_is_the_token_mean_over_the_fixed_prefix():
    ev = AffineSequences(5, seed=5)  # batch_size 2 -> batches of 2, 2, 1 samples
    model = TinyLM()
    res = train(model, lm_loss, AffineSequences(16), _cfg(max_steps=2, eval_batches=10, batch_size=2), eval_data=ev)
    e = res.eval_history[-1]
    model.eval()
    with torch.no_grad():
        whole, m = lm_loss(model, ev.collate([ev[i] for i in range(5)]))  # one batch of all 5 samples
    assert e["eval_loss"] == pytest.approx(whole.item(), rel=1e-6)
    assert e["eval_accuracy"] == pytest.approx(m["accuracy"].item(), rel=1e-6)
    assert e["eval_ppl"] == pytest.approx(math.exp(e["eval_loss"]))
    res2 = train(TinyLM(), lm_loss, AffineSequences(16), _cfg(max_steps=1, eval_batches=1, batch_size=2), eval_data=ev)
    assert res2.tokens_per_s > 0 and res2.out_dir is None and res2.checkpoint is None


def test_too_little_data_is_a_clear_error():
    from taskmoe.errors import DataError

    with pytest.raises(DataError, match="fewer than one global batch of 8"):
        train(TinyLM(), lm_loss, AffineSequences(5), _cfg(batch_size=4, grad_accum=2))


def test_worker_processes_and_bf16_fallback_change_nothing(caplog):
    data = AffineSequences(16)
    runs = []
    for kw in [{}, {"num_workers": 1}, {"mixed_precision": "bf16"}]:
        torch.manual_seed(0)
        runs.append(train(TinyLM(), lm_loss, data, _cfg(max_steps=3, **kw)).losses)
    assert runs[1] == runs[0]
    if not torch.cuda.is_available():
        assert runs[2] == runs[0] and "needs CUDA" in caplog.text


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step, record):
        return step >= self.step


def test_a_resume_with_another_lr_applies_it_and_records_that_it_did(tmp_path, caplog):
    """Both resumes start from the step-6 checkpoint with the same weights, Adam moments, data and
    RNG, so step 7's Adam direction is the same and the update scales with the lr used: a resume at
    lr 3e-3 moves every parameter 0.3 times as far as a resume at the checkpoint's 1e-2."""
    import shutil

    from taskmoe.training.optim import lr_factor

    data = AffineSequences(38, seed=0)
    cfg = _cfg(eval_every=0, save_every=3, keep_last=5)
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train(TinyLM(), _crash_on_call(14), data, cfg, out_dir=tmp_path / "a")  # dies in step 7
    assert load_latest(tmp_path / "a").step == 6
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    start = TinyLM()
    load_latest(tmp_path / "a").load_model(start)

    same, new = TinyLM(), TinyLM()
    train(same, lm_loss, data, cfg, out_dir=tmp_path / "a", callbacks=[_StopAt(7)])
    with caplog.at_level("WARNING", logger="taskmoe.training.checkpoint"):
        train(new, lm_loss, data, cfg.replace(lr=3e-3), out_dir=tmp_path / "b", callbacks=[_StopAt(7)])
    assert "resume: lr changed 0.01 -> 0.003 (applied from step 7)" in caplog.text
    s0 = start.state_dict()
    for k, v in s0.items():
        d_same, d_new = same.state_dict()[k] - v, new.state_dict()[k] - v
        assert torch.allclose(d_new, 0.3 * d_same, rtol=1e-4, atol=1e-7), k

    lines = _metric_lines(tmp_path / "b" / "metrics.jsonl")
    resume = [r for r in lines if r["kind"] == "resume"]
    assert resume == [{"kind": "resume", "checkpoint": str(tmp_path / "b" / "checkpoints" / "step-000006"),
                       "step": 6, "changed": {"lr": [0.01, 0.003]}}]
    step7 = [r for r in lines if r["kind"] == "train" and r["step"] == 7][-1]
    assert step7["lr"] == pytest.approx(3e-3 * lr_factor(6, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio), rel=1e-12)
    ts = load_latest(tmp_path / "b").trainer_state
    assert ts["config"]["lr"] == 3e-3 and ts["resumes"] == [{"step": 6, "changed": {"lr": [0.01, 0.003]}}]
    assert load_latest(tmp_path / "a").trainer_state["resumes"] == []  # an unchanged resume records nothing
