"""THE train loop every recipe uses: :func:`train`.

What it does, in order, per optimizer step:

1. take the next ``grad_accum`` micro-batches of this process from the deterministic sampler
   (:mod:`taskmoe.training.sampler`);
2. ``loss, metrics = loss_fn(model, batch)`` and ``backward(loss / grad_accum)`` for each
   (gradients are all-reduced only on the last micro-batch under DDP);
3. all-reduce the step's mean loss and metrics; a NaN/inf loss or gradient norm raises
   :class:`~taskmoe.errors.TrainingError` naming the step *before* the update, so neither the
   model nor any checkpoint ever holds a non-finite state;
4. clip the global gradient norm, AdamW step, LR schedule step (warmup + cosine,
   :mod:`taskmoe.training.optim`);
5. log (metrics.jsonl, progress bar), call callbacks, evaluate (:mod:`taskmoe.training.evaluate`),
   save a checkpoint.

Protocols (what recipes pass in):

- ``train_data``: a map-style dataset (``__len__``, ``__getitem__(i) -> sample``). Samples are
  batched by ``collate_fn``, else ``train_data.collate`` if it exists, else torch's
  ``default_collate``. ``eval_data`` likewise (its own ``collate`` or the same ``collate_fn``).
- ``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` a scalar tensor, the *mean* over the
  micro-batch; ``metrics`` a dict of scalars (floats or 0-dim tensors) averaged and logged.
  The special key ``"tokens"`` is the number of tokens the loss averages over: it drives
  tokens/s and weighs eval batches (summed, never averaged); without it the loop counts
  ``batch["input_ids"]`` (or the batch tensor) for tokens/s and weighs eval batches by
  samples. During training ``model`` may be DDP-wrapped: call it, do not reach into its
  attributes. Evaluation runs ``eval_fn`` (default ``loss_fn``) on the unwrapped model under
  ``no_grad``.
- ``callbacks``: objects with any of ``on_step_end(step, record) -> bool | None`` (True asks the
  loop to stop after this step's eval/save), ``on_eval(step, record)``, and ``state_dict()`` /
  ``load_state_dict(d)`` (JSON) to be checkpointed with the run.

Distributed: launch the same script with ``accelerate launch --multi_gpu --num_processes N``
(or ``torchrun --nproc_per_node N``); on CPU this is DDP over gloo (accelerate's ``--cpu`` flag
alone would start a single process). Only the main process writes files.

A fresh run seeds torch, python ``random`` and numpy with ``cfg.seed + rank`` (the model is
built by the caller beforehand, so its initialisation is the caller's). Resume is exact:
model, optimizer, scheduler, every RNG (per rank), the data position, the loss history and
callback state are restored, so an interrupted run continued to ``max_steps`` reproduces the
uninterrupted run's per-step losses bit for bit (same hardware and world size).

A resume with a changed config (``--lr``...) applies it and records each change (log, a
``{"kind": "resume"}`` line in metrics.jsonl, ``resumes`` in checkpoints): what is recorded trained.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from taskmoe.errors import TrainingError
from taskmoe.progress import progress_bar
from taskmoe.training.checkpoint import (
    Checkpoint,
    checkpoints_dir,
    list_checkpoints,
    load_latest,
    open_checkpoint,
    save_checkpoint,
    step_dirname,
)
from taskmoe.training.config import TrainConfig
from taskmoe.training.evaluate import evaluate, to_device as _to_device
from taskmoe.training.metrics import MetricsWriter
from taskmoe.training.optim import build_optimizer, build_scheduler
from taskmoe.training.rng import capture_rng, restore_rng, seed_everything
from taskmoe.training.sampler import BatchPlan, DataPosition, iterate_steps, resolve_collate

log = logging.getLogger(__name__)

_BAR_FIELDS = ("loss {task.fields[loss]}", "{task.fields[tps]} tok/s")

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


@dataclass
class TrainResult:
    """What :func:`train` returns. ``losses[i]`` is the mean training loss of step ``i + 1``."""

    steps: int
    losses: list[float]
    eval_history: list[dict[str, float]]
    tokens_per_s: float
    out_dir: Path | None
    checkpoint: Path | None = None
    stopped_early: bool = False


@dataclass
class _RunState:
    """Everything about the run itself that a checkpoint stores (besides model/optimizer/RNG)."""

    step: int = 0
    pos: DataPosition = field(default_factory=DataPosition)
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    train_time: float = 0.0
    resumes: list[dict[str, Any]] = field(default_factory=list)  # {"step", "changed": {key: [old, new]}}

    def to_json(self, plan: BatchPlan, cfg: TrainConfig, callbacks: Sequence[Any]) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.pos.epoch, "index": self.pos.index,
            "num_samples": plan.num_samples, "global_batch": plan.global_batch, "world_size": plan.world_size,
            "losses": self.losses, "eval_history": self.eval_history,
            "tokens": self.tokens, "train_time": self.train_time,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks],
            "config": cfg.to_dict(), "resumes": self.resumes,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "_RunState":
        return cls(
            step=int(d["step"]), pos=DataPosition(int(d["epoch"]), int(d["index"])), losses=list(d["losses"]),
            eval_history=list(d["eval_history"]), tokens=int(d["tokens"]), train_time=float(d["train_time"]),
            resumes=list(d.get("resumes", [])),
        )  # fmt: skip


def make_accelerator(cfg: TrainConfig) -> Any:
    """An ``accelerate.Accelerator`` for ``cfg``: CUDA when available, else CPU (gloo DDP).

    Without CUDA the accelerator is created with ``cpu=True``, which is what makes accelerate
    treat a multi-process launch (``accelerate launch --multi_gpu --num_processes N`` or
    ``torchrun --nproc_per_node N``) as CPU DDP over gloo instead of N independent runs.
    bf16 falls back to float32 without CUDA.
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "bf16" and not cuda:
        log.warning("TrainConfig.mixed_precision='bf16' needs CUDA; training in float32 on this machine")
        mp = "no"
    return Accelerator(mixed_precision=mp, cpu=not cuda)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Any,
    cfg: TrainConfig,
    *,
    eval_data: Any = None,
    eval_fn: LossFn | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    out_dir: str | Path | None = None,
    resume: bool | str | Path = True,
    callbacks: Sequence[Any] | None = None,
    accelerator: Any = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps (see module docstring).

    Args:
        out_dir: run folder for ``checkpoints/`` and ``metrics.jsonl``; None trains in memory.
        resume: True continues from the newest complete checkpoint in ``out_dir`` if any;
            a path resumes from that checkpoint folder; False starts fresh and refuses an
            ``out_dir`` that already holds checkpoints.
        accelerator: an ``accelerate.Accelerator`` to use (e.g. with DDP kwargs); default one
            from :func:`make_accelerator`.
    """
    acc = accelerator if accelerator is not None else make_accelerator(cfg)
    rank, world = acc.process_index, acc.num_processes
    out = Path(out_dir) if out_dir is not None else None
    callbacks = list(callbacks or [])
    collate = resolve_collate(train_data, collate_fn)
    plan = BatchPlan(len(train_data), cfg.batch_size, cfg.grad_accum, world, cfg.seed)

    raw = model.to(acc.device)
    optimizer = build_optimizer(raw, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    ckpt = _resume_checkpoint(out, resume)
    st = _RunState()
    if ckpt is not None:
        st = _restore(ckpt, raw, optimizer, scheduler, callbacks, plan, rank, cfg)
    else:
        seed_everything(cfg.seed + rank)
    if st.step >= cfg.max_steps:
        return _result(st, out, ckpt.path if ckpt else None, False)

    wrapped = acc.prepare(raw)  # DDP-wrapped when launched with several processes
    params = [p for g in optimizer.param_groups for p in g["params"]]
    writer = MetricsWriter(out if acc.is_main_process else None, resume_step=st.step, tensorboard=cfg.tensorboard)
    if st.resumes and st.resumes[-1]["step"] == st.step and ckpt is not None:
        writer.write({"kind": "resume", "checkpoint": str(ckpt.path), **st.resumes[-1]})
    steps = iterate_steps(train_data, collate, plan, rank, st.pos, cfg.num_workers)
    last_ckpt, stopped = (ckpt.path if ckpt else None), False
    wrapped.train()
    try:
        with progress_bar(cfg.progress and acc.is_main_process, fields=_BAR_FIELDS) as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=st.step, loss="-", tps="-")
            while st.step < cfg.max_steps and not stopped:
                step = st.step + 1
                t0 = time.perf_counter()  # tokens/s includes data loading
                micro, next_pos = next(steps)
                lr = scheduler.get_last_lr()[0]
                loss, tokens, metrics = _accumulate(wrapped, loss_fn, micro, acc)
                if not math.isfinite(loss):
                    writer.write({"kind": "error", "step": step, "loss": loss})
                    raise _nonfinite("loss", loss, step, last_ckpt)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
                if not math.isfinite(grad_norm):
                    writer.write({"kind": "error", "step": step, "grad_norm": grad_norm})
                    raise _nonfinite("gradient norm", grad_norm, step, last_ckpt)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                st.step, st.pos = step, next_pos
                st.losses.append(loss)
                st.tokens += tokens
                st.train_time += dt
                tps = tokens / dt if dt > 0 else 0.0
                record = {"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tps, "epoch": next_pos.epoch, **metrics}  # fmt: skip
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    writer.write(record)
                bar.update(task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
                for cb in callbacks:
                    if hasattr(cb, "on_step_end") and cb.on_step_end(step, record):
                        stopped = True
                last = step == cfg.max_steps or stopped
                if eval_data is not None and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                    ev = {"step": step, **evaluate(raw, eval_fn or loss_fn, eval_data, cfg, acc, collate_fn)}
                    st.eval_history.append(ev)
                    writer.write({"kind": "eval", **ev})
                    for cb in callbacks:
                        if hasattr(cb, "on_eval"):
                            cb.on_eval(step, ev)
                if out is not None and (last or (cfg.save_every and step % cfg.save_every == 0)):
                    last_ckpt = _save(out, st, raw, optimizer, scheduler, plan, cfg, acc, callbacks)
    finally:
        writer.close()
    return _result(st, out, last_ckpt, stopped)


# ---------------------------------------------------------------------------------- helpers
def _accumulate(model: nn.Module, loss_fn: LossFn, micro: list[Any], acc: Any) -> tuple[float, int, dict[str, float]]:
    """Forward/backward every micro-batch; return the step's mean loss, token count and metrics
    (all-reduced over processes: loss and metrics averaged, tokens summed)."""
    A = len(micro)
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    tokens = 0
    metric_sums: dict[str, torch.Tensor] = {}
    for m, batch in enumerate(micro):
        batch = _to_device(batch, acc.device)
        with acc.no_sync(model) if m < A - 1 else nullcontext():
            loss, metrics = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TrainingError(f"loss_fn must return a scalar tensor as its loss, got {type(loss).__name__}")
            acc.backward(loss / A)
        loss_sum += loss.detach().double()
        metrics = dict(metrics)
        tokens += int(metrics.pop("tokens", _count_tokens(batch)))
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64, device=acc.device).detach()
    keys = sorted(metric_sums)
    vec = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=acc.device)] + [metric_sums[k] for k in keys])
    world = acc.num_processes
    if world > 1:
        vec = acc.reduce(vec, reduction="sum")
    vals = vec.tolist()
    mean_loss = vals[0] / (A * world)
    return mean_loss, int(vals[1]), {k: v / (A * world) for k, v in zip(keys, vals[2:])}


def _count_tokens(batch: Any) -> int:
    t = batch.get("input_ids") if isinstance(batch, dict) else batch
    return t.numel() if isinstance(t, torch.Tensor) else 0


def _nonfinite(what: str, value: float, step: int, last_ckpt: Path | None) -> TrainingError:
    keep = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
    return TrainingError(
        f"non-finite {what} ({value}) at step {step}; stopped before the update and saved nothing ({keep}). "
        "Lower the learning rate, check the data of this step, or enable grad_clip."
    )


def _resume_checkpoint(out: Path | None, resume: bool | str | Path) -> Checkpoint | None:
    if resume is True:
        return load_latest(out) if out is not None else None
    if resume is False:
        if out is not None and list_checkpoints(out):
            raise TrainingError(f"{checkpoints_dir(out)} already holds checkpoints; pass resume=True to continue "
                                "that run, or use another out_dir")
        return None
    return open_checkpoint(resume)


def _restore(ckpt: Checkpoint, raw: nn.Module, optimizer: Any, scheduler: Any, callbacks: list[Any],
             plan: BatchPlan, rank: int, cfg: TrainConfig) -> _RunState:  # fmt: skip
    ckpt.load_model(raw)
    changed = ckpt.load_optimization(optimizer, scheduler, cfg)  # applies (and returns) any config change
    ts = ckpt.trainer_state
    if ts.get("num_samples") != plan.num_samples or ts.get("global_batch") != plan.global_batch:
        log.warning("%s: saved with %s samples / global batch %s, now %s / %s: resuming, but not exactly",
                    ckpt.path, ts.get("num_samples"), ts.get("global_batch"), plan.num_samples, plan.global_batch)
    for cb, s in zip(callbacks, ts.get("callbacks", [])):
        if s is not None and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(s)
    rng = ckpt.rng_state(rank)
    if rng is not None:
        restore_rng(rng)
    else:
        log.warning("%s: no RNG state for process %d; reseeding it", ckpt.path, rank)
        seed_everything(int(ts.get("config", {}).get("seed", 0)) + rank + ckpt.step)
    log.info("resumed from %s (step %d)", ckpt.path, ckpt.step)
    st = _RunState.from_json(ts)
    st.resumes += [{"step": ckpt.step, "changed": changed}] if changed else []
    return st


def _save(out: Path, st: _RunState, raw: nn.Module, optimizer: Any, scheduler: Any, plan: BatchPlan,
          cfg: TrainConfig, acc: Any, callbacks: list[Any]) -> Path:  # fmt: skip
    rngs = [capture_rng()]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object(rngs)  # one entry per rank, in rank order
    if acc.is_main_process:
        save_checkpoint(
            out, st.step, model_state=raw.state_dict(), optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(), trainer_state=st.to_json(plan, cfg, callbacks),
            rng_states=rngs, keep_last=cfg.keep_last,
        )  # fmt: skip
    acc.wait_for_everyone()
    return checkpoints_dir(out) / step_dirname(st.step)


def _result(st: _RunState, out: Path | None, ckpt: Path | None, stopped: bool) -> TrainResult:
    tps = st.tokens / st.train_time if st.train_time > 0 else 0.0
    return TrainResult(st.step, list(st.losses), list(st.eval_history), tps, out, ckpt, stopped)
