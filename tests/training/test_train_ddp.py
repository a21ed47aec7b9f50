"""2-process CPU DDP (gloo) through ``accelerate launch`` matches one process with the same global batch.

Tolerance: DDP averages the two ranks' gradients (mean of two 2-sample means) where one process
takes the mean of 4 samples, so sums happen in a different order: losses agree to rel 1e-5 and
weights to atol 1e-5 (float32), not bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taskmoe.io import load_tensors

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ddp_train_script.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, batch_size: int, grad_accum: int, crash_at: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(SCRIPT), str(out), str(batch_size), str(grad_accum)]  # fmt: skip
    if crash_at:
        cmd.append(str(crash_at))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)


def _check(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_two_process_ddp_matches_single_process(tmp_path):
    from ddp_train_script import run

    single = run(tmp_path / "single", batch_size=4, grad_accum=2)
    _check(_launch(tmp_path / "ddp", batch_size=2, grad_accum=2))
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert ddp["world_size"] == 2
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert len(ddp["eval_history"]) == len(single["eval_history"]) == 2
    for a, b in zip(ddp["eval_history"], single["eval_history"]):
        assert a["step"] == b["step"] and a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
    w_ddp, w_single = load_tensors(tmp_path / "ddp" / "final.safetensors"), load_tensors(tmp_path / "single" / "final.safetensors")
    for k, v in w_single.items():
        assert torch.allclose(w_ddp[k], v, atol=1e-5), k
    rng = json.loads((tmp_path / "ddp" / "run" / "checkpoints" / "step-000006" / "rng.json").read_text())
    assert rng["world_size"] == 2  # each rank's RNG state is checkpointed


@pytest.mark.slow
def test_two_process_ddp_resume_is_exact(tmp_path):
    _check(_launch(tmp_path / "ref", batch_size=2, grad_accum=2))
    crashed = _launch(tmp_path / "run", batch_size=2, grad_accum=2, crash_at=5)
    assert crashed.returncode != 0 and "simulated crash at step 5" in crashed.stderr
    _check(_launch(tmp_path / "run", batch_size=2, grad_accum=2))
    ref = json.loads((tmp_path / "ref" / "result.json").read_text())
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["losses"] == ref["losses"] and res["eval_history"] == ref["eval_history"]
    a, b = load_tensors(tmp_path / "ref" / "final.safetensors"), load_tensors(tmp_path / "run" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
