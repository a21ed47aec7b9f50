"""Training checkpoints: atomic saves, crash safety, completeness checks and clear load errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from taskmoe.errors import CheckpointError
from taskmoe.training.checkpoint import (
    LATEST,
    OPTIM_JSON,
    flatten_state,
    list_checkpoints,
    load_latest,
    open_checkpoint,
    unflatten_state,
)
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train
from train_helpers import AffineSequences, TinyLM, lm_loss


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=2, save_every=2, keep_last=3,
                eval_every=0, log_every=1, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


DATA = AffineSequences(20)


def test_flatten_state_round_trips_a_real_optimizer_state():
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    lm_loss(model, DATA.collate([DATA[0], DATA[1]]))[0].backward()
    opt.step()
    sd = opt.state_dict()
    tree, tensors = flatten_state(sd)
    json.dumps(tree)  # the non-tensor part is plain JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values()) and "state.0.exp_avg" in tensors
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert back["param_groups"] == sd["param_groups"]  # tuples (betas) and int keys restored
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    assert set(back["state"]) == set(sd["state"])
    for i, s in sd["state"].items():
        for k, v in s.items():
            assert torch.equal(back["state"][i][k], v)
    with pytest.raises(CheckpointError, match="cannot store set at 'x'"):
        flatten_state({"x": {1, 2}})
    with pytest.raises(CheckpointError, match="tensor 'a' is missing"):
        unflatten_state({"__tensor__": "a"}, {})


def test_checkpoint_holds_every_part_and_keeps_the_last_n(tmp_path):
    train(TinyLM(), lm_loss, DATA, _cfg(max_steps=10, keep_last=2), out_dir=tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8, 10]
    assert json.loads((tmp_path / "checkpoints" / LATEST).read_text()) == {"step": 10, "path": "step-000010"}
    ck = load_latest(tmp_path)
    names = sorted(p.name for p in ck.path.iterdir())
    assert names == sorted(["config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
                            "scheduler.json", "rng.safetensors", "rng.json", "trainer_state.json"])
    assert ck.trainer_state["step"] == 10 and len(ck.trainer_state["losses"]) == 10
    assert json.loads((ck.path / "scheduler.json").read_text())["last_epoch"] == 10
    rng = ck.rng_state(0)
    assert rng.torch_cpu.dtype == torch.uint8 and ck.rng_state(1) is None
    assert not any(p.name.endswith(".pkl") or p.name.endswith(".pt") for p in tmp_path.rglob("*"))


def _failing_rename(match: str):
    real = os.replace

    def fake(src, dst, *a, **kw):
        if Path(dst).name == match:
            raise OSError(f"simulated crash while renaming into {dst}")
        return real(src, dst, *a, **kw)

    return fake


def test_save_killed_midway_keeps_previous_checkpoint_and_resume_works(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ref = train(TinyLM(), lm_loss, DATA, _cfg(), out_dir=tmp_path / "ref")
    # every file of step 4 is written into the temp folder, then the folder rename "crashes"
    monkeypatch.setattr(os, "replace", _failing_rename("step-000004"))
    torch.manual_seed(0)
    with pytest.raises(OSError, match="simulated crash"):
        train(TinyLM(), lm_loss, DATA, _cfg(), out_dir=tmp_path / "run")
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert not list(root.glob(".step-*"))  # the temp folder was cleaned up
    assert json.loads((root / LATEST).read_text())["step"] == 2
    ck = load_latest(tmp_path / "run")
    assert ck.step == 2
    ck.load_model(TinyLM())
    res = train(TinyLM(), lm_loss, DATA, _cfg(), out_dir=tmp_path / "run")
    assert res.losses == ref.losses


def test_hard_kill_leftovers_are_skipped_and_cleaned(tmp_path):
    train(TinyLM(), lm_loss, DATA, _cfg(max_steps=4), out_dir=tmp_path)
    root = tmp_path / "checkpoints"
    # a temp folder left by a killed process, and a step folder copied without its config.json
    stale = root / ".step-000006.tmp-deadbeef"
    shutil.copytree(root / "step-000004", stale)
    partial = root / "step-000006"
    shutil.copytree(root / "step-000004", partial)
    (partial / "config.json").unlink()
    assert load_latest(tmp_path).step == 4  # the partial step 6 is skipped
    train(TinyLM(), lm_loss, DATA, _cfg(max_steps=6), out_dir=tmp_path)
    assert not stale.exists()
    assert load_latest(tmp_path).step == 6


def test_crash_between_folder_rename_and_latest_pointer(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _failing_rename(LATEST))
    with pytest.raises(OSError):
        train(TinyLM(), lm_loss, DATA, _cfg(max_steps=2), out_dir=tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / LATEST).exists()
    assert load_latest(tmp_path).step == 2  # the folder itself is complete, so it is used


def test_wrong_vocabulary_size_names_the_file(tmp_path):
    train(TinyLM(vocab=32), lm_loss, DATA, _cfg(max_steps=2), out_dir=tmp_path)
    ck = load_latest(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*vocabulary size mismatch: checkpoint has 32, model expects 40"):
        ck.load_model(TinyLM(vocab=40))
    with pytest.raises(CheckpointError, match="vocabulary size mismatch"):
        train(TinyLM(vocab=40), lm_loss, DATA, _cfg(max_steps=4), out_dir=tmp_path)


def test_truncated_weights_are_skipped_by_load_latest_and_named_when_explicit(tmp_path):
    train(TinyLM(), lm_loss, DATA, _cfg(max_steps=4), out_dir=tmp_path)
    newest = tmp_path / "checkpoints" / "step-000004"
    f = newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"step-000004/model\.safetensors: corrupt or truncated"):
        open_checkpoint(newest)
    assert load_latest(tmp_path).step == 2
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        train(TinyLM(), lm_loss, DATA, _cfg(max_steps=6), out_dir=tmp_path, resume=newest)


def test_missing_config_and_missing_file_are_named(tmp_path):
    train(TinyLM(), lm_loss, DATA, _cfg(max_steps=4), out_dir=tmp_path)
    ck4 = tmp_path / "checkpoints" / "step-000004"
    (ck4 / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-000004/config\.json: missing config\.json"):
        open_checkpoint(ck4)
    (tmp_path / "checkpoints" / "step-000002" / "rng.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-000002/rng\.json: missing"):
        open_checkpoint(tmp_path / "checkpoints" / "step-000002")
    assert load_latest(tmp_path) is None


def test_optimizer_state_for_a_different_set_of_trainable_params_is_refused(tmp_path):
    train(TinyLM(), lm_loss, DATA, _cfg(max_steps=2), out_dir=tmp_path)
    model = TinyLM()
    model.head.requires_grad_(False)
    with pytest.raises(CheckpointError, match=OPTIM_JSON + ": optimizer parameter groups have sizes"):
        train(model, lm_loss, DATA, _cfg(max_steps=4), out_dir=tmp_path)


def test_resuming_from_an_older_checkpoint_drops_the_abandoned_newer_ones(tmp_path):
    train(TinyLM(), lm_loss, DATA, _cfg(max_steps=6), out_dir=tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 6]
    older = tmp_path / "checkpoints" / "step-000002"
    res = train(TinyLM(), lm_loss, DATA, _cfg(max_steps=6, save_every=3), out_dir=tmp_path, resume=older)
    assert res.steps == 6
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3, 6]  # old 4 and 6 removed at the save of 3
