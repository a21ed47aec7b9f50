"""Run by ``accelerate launch`` in the DDP test (and imported by it for the single-process twin).

``python ddp_train_script.py OUT BATCH_SIZE GRAD_ACCUM [CRASH_AT_STEP]`` trains a TinyLM (no
dropout) with the shared train loop into ``OUT/run`` (resuming from its checkpoints) and, on the
main process, writes ``OUT/result.json`` (losses, eval history, world size) and
``OUT/final.safetensors`` (the final weights). With ``CRASH_AT_STEP`` every process raises
during that step's first micro-batch (after the checkpoint of step 3), simulating a crash.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from taskmoe.io import save_tensors
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train
from train_helpers import AffineSequences, TinyLM, lm_loss

STEPS = 6


class Crash(Exception):
    pass


def run(out: Path, batch_size: int, grad_accum: int, crash_at: int = 0, accelerator=None) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyLM(dropout=0.0)
    cfg = TrainConfig(max_steps=STEPS, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup_steps=2,
                      eval_every=3, eval_batches=3, save_every=3, log_every=1, progress=False, seed=11)  # fmt: skip
    calls = {"n": 0}

    def loss_fn(m, batch):
        if m.training:
            calls["n"] += 1
            if crash_at and calls["n"] == (crash_at - 1) * grad_accum + 1:
                raise Crash(f"simulated crash at step {crash_at}")
        return lm_loss(m, batch)

    res = train(model, loss_fn, AffineSequences(40), cfg, eval_data=AffineSequences(10, seed=2),
                out_dir=out / "run", accelerator=accelerator)  # fmt: skip
    result = {"losses": res.losses, "eval_history": res.eval_history}
    if accelerator is None or accelerator.is_main_process:
        from accelerate import PartialState

        result["world_size"] = PartialState().num_processes
        save_tensors(out / "final.safetensors", model.state_dict())
        (out / "result.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
