"""Distributed expert training: ``accelerate launch --multi_gpu --num_processes 2 -m taskmoe.cli train
experts`` (CPU, gloo) matches one process with the same global batch.

Both runs train expert ``c0`` of the same run folder with the semantic loss on (λ = 0.1): the 2-process
run with ``batch_size=2`` per process, the single one with ``batch_size=4``. The loop's sampler gives
both the same 4 windows per update; DDP averages two 2-window gradient means where one process
takes one 4-window mean, so float32 sums happen in another order. Tolerance: per-step losses and
evaluation losses (over every validation window) within rel 1e-5, final weights within atol 1e-5 (12 AdamW steps
at lr 3e-3; measured: they agree to 1e-6).

The fast variant checks the same contract inside one process (``batch_size=4`` vs ``2`` with
``grad_accum=2``), which is what DDP equivalence rests on: the recipe's loss is a per-batch mean.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experts_helpers import make_run, tiny_lm, write_jsonl
from taskmoe.io import load_tensors
from taskmoe.training.config import TrainConfig
from taskmoe.training.recipes.experts import ExpertsRecipeConfig, train_experts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ddp")
    torch.set_num_threads(1)
    return make_run(d / "run"), write_jsonl(d / "docs.jsonl")


def _config(path: Path, batch_size: int, grad_accum: int = 1) -> Path:
    ExpertsRecipeConfig(lm=tiny_lm(), seq_len=32, lam=0.1, neighbours=3, train=TrainConfig(
        max_steps=12, batch_size=batch_size, grad_accum=grad_accum, lr=3e-3, warmup_steps=2, eval_every=6,
        eval_batches=16, save_every=6, log_every=1, progress=False, seed=5)).save(path)
    return path


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "train" / "experts" / "c0" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _compare(a: Path, b: Path, rel: float, atol: float) -> None:
    ta, tb = _records(a, "train"), _records(b, "train")
    assert [r["step"] for r in ta] == list(range(1, 13)) == [r["step"] for r in tb]
    assert [r["loss"] for r in ta] == pytest.approx([r["loss"] for r in tb], rel=rel)
    assert [r["sem_sim"] for r in ta] == pytest.approx([r["sem_sim"] for r in tb], rel=rel)
    ea, eb = _records(a, "eval"), _records(b, "eval")
    assert len(ea) == len(eb) == 2
    assert [r["eval_ce"] for r in ea] == pytest.approx([r["eval_ce"] for r in eb], rel=rel)
    wa, wb = (load_tensors(r / "experts" / "c0" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol), k


def test_accumulation_matches_a_bigger_batch(base, tmp_path: Path) -> None:
    run, src = base
    big, acc = _copy(run, tmp_path / "big"), _copy(run, tmp_path / "acc")
    train_experts(big, expert="c0", source=str(src), config=_config(tmp_path / "b4.json", 4), progress=False)
    train_experts(acc, expert="c0", source=str(src), config=_config(tmp_path / "b2a2.json", 2, 2), progress=False)
    _compare(big, acc, rel=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(base, tmp_path: Path) -> None:
    run, src = base
    single, ddp = _copy(run, tmp_path / "single"), _copy(run, tmp_path / "ddp")
    train_experts(single, expert="c0", source=str(src), config=_config(tmp_path / "b4.json", 4), progress=False)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "taskmoe.cli", "train", "experts", "--run", str(ddp),
           "--expert", "c0", "--source", str(src), "--config", str(_config(tmp_path / "b2.json", 2)), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rng = json.loads((ddp / "train" / "experts" / "c0" / "checkpoints" / "step-000012" / "rng.json").read_text())
    assert rng["world_size"] == 2  # really two processes
    _compare(ddp, single, rel=1e-5, atol=1e-5)
    assert json.loads((ddp / "taskmoe.json").read_text())["experts"] == {"0": "experts/c0"}
