"""Training checkpoints: atomic step folders holding everything exact resume needs.

Layout under a run folder::

    <out_dir>/checkpoints/
        step-000100/                 one checkpoint (a taskmoe component of kind "train_checkpoint")
            config.json              {"format_version", "kind", "config": {"step", "files"}, "meta"}
            model.safetensors        model weights (unwrapped from DDP)
            optimizer.safetensors    every tensor of the optimizer state_dict ...
            optimizer.json           ... and the rest of it, tensors replaced by references
            scheduler.json           LR scheduler state_dict (plain JSON)
            rng.safetensors          torch CPU (and CUDA) RNG states, one set per process rank
            rng.json                 python `random` and numpy states per rank
            trainer_state.json       step, data position, loss/eval history, callback state
        step-000200/
        latest.json                  {"step", "path"}: written last, after the folder is in place

Design choices:

- **Atomic folders** come from :func:`taskmoe.io.save_component`: the folder is built under a
  temporary name (each file written to a temp file, fsync-ed, renamed), ``config.json`` is
  written last, then the folder is renamed into place. A crash leaves the previous checkpoints
  untouched plus, at worst, a hidden ``.step-*.tmp-*`` folder that the next save removes.
- **Completeness is checked, not assumed**: :func:`open_checkpoint` requires ``config.json``,
  every file it lists, readable safetensors headers and parseable JSON; :func:`load_latest`
  walks back from the newest step folder and skips (with a warning) any that fails.
- **No pickle**: optimizer/scheduler state dicts are flattened by :func:`flatten_state` into a
  JSON tree plus a flat ``{name: tensor}`` map (tuples and non-string dict keys are tagged so
  they round-trip exactly).
- **A resume applies the current config**: :func:`config_changes` lists what differs from the
  checkpoint's config and :func:`apply_hyperparameters` puts the current values into the
  restored optimizer and schedule (the loop logs and records each change), so a checkpoint never
  records one lr while the run trains with another.
- **One timeline**: after saving step ``s`` the folder keeps ``s`` and the ``keep_last - 1``
  newest steps *before* ``s``; steps after ``s`` (left by a run that was resumed from an older
  checkpoint) are deleted, so "latest" always means the current run's newest state.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from taskmoe.errors import CheckpointError
from taskmoe.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_write_json,
    load_component,
    load_state_into,
    load_tensors,
    read_json,
    save_component,
    save_lock,
    save_tensors,
)
from taskmoe.training.config import TrainConfig
from taskmoe.training.rng import RNGState

log = logging.getLogger(__name__)

KIND = "train_checkpoint"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
OPTIM_TENSORS, OPTIM_JSON = "optimizer.safetensors", "optimizer.json"
SCHED_JSON = "scheduler.json"
RNG_TENSORS, RNG_JSON = "rng.safetensors", "rng.json"
STATE_JSON = "trainer_state.json"
FILES = (WEIGHTS_FILE, OPTIM_TENSORS, OPTIM_JSON, SCHED_JSON, RNG_TENSORS, RNG_JSON, STATE_JSON)
_STEP_RE = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------ state dict <-> JSON + tensors
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into JSON and tensors.

    Tensors become ``{"__tensor__": name}`` with ``name`` the dotted path; tuples become
    ``{"__tuple__": [...]}``; dicts with non-string keys become ``{"__items__": [[k, v], ...]}``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            tensors[path] = o
            return {"__tensor__": path}
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in o.items()}
            return {"__items__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise CheckpointError(f"cannot store {type(o).__name__} at '{path}' in a checkpoint (JSON/tensors only)")

    return walk(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor], source: str | Path = "state") -> Any:
    """Inverse of :func:`flatten_state`; a missing tensor raises CheckpointError naming ``source``."""

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            if set(o) == {"__tensor__"}:
                if o["__tensor__"] not in tensors:
                    raise CheckpointError(f"{source}: tensor '{o['__tensor__']}' is missing")
                return tensors[o["__tensor__"]]
            if set(o) == {"__tuple__"}:
                return tuple(walk(v) for v in o["__tuple__"])
            if set(o) == {"__items__"}:
                return {k: walk(v) for k, v in o["__items__"]}
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(tree)


# ----------------------------------------------------------------------------------- saving
def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def step_dirname(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every step folder under ``out_dir/checkpoints``, oldest first (unvalidated)."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
    rng_states: list[RNGState],
    keep_last: int,
) -> Path:
    """Atomically write checkpoint ``step`` (see module docstring), update ``latest.json``, prune.

    ``rng_states`` holds one entry per process rank. Returns the checkpoint folder.
    """
    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with save_lock(root):  # every step save holds it, so any temp folder found now is a dead writer's
        for stale in root.glob(".step-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    opt_tree, opt_tensors = flatten_state(optimizer_state)
    sched_tree, sched_tensors = flatten_state(scheduler_state)
    if sched_tensors:
        raise CheckpointError(f"scheduler state holds tensors {sorted(sched_tensors)}; only JSON values are supported")
    rng_tensors: dict[str, torch.Tensor] = {}
    for r, s in enumerate(rng_states):
        rng_tensors.update(s.tensors(prefix=f"rank{r}."))
    rng_json = {"world_size": len(rng_states), "ranks": [s.json() for s in rng_states]}
    state = {**trainer_state, "step": step}

    folder = root / step_dirname(step)
    save_component(
        folder,
        KIND,
        {"step": step, "files": list(FILES)},
        tensors=model_state,
        extra_files={
            OPTIM_TENSORS: lambda p: save_tensors(p, opt_tensors),
            OPTIM_JSON: lambda p: atomic_write_json(p, opt_tree),
            SCHED_JSON: lambda p: atomic_write_json(p, sched_tree),
            RNG_TENSORS: lambda p: save_tensors(p, rng_tensors),
            RNG_JSON: lambda p: atomic_write_json(p, rng_json),
            STATE_JSON: lambda p: atomic_write_json(p, state),
        },
    )
    atomic_write_json(root / LATEST, {"step": step, "path": folder.name})
    _prune(out_dir, step, keep_last)
    return folder


def _prune(out_dir: str | Path, current: int, keep_last: int) -> None:
    older = [p for s, p in list_checkpoints(out_dir) if s < current]
    newer = [p for s, p in list_checkpoints(out_dir) if s > current]
    doomed = older[: max(0, len(older) - (keep_last - 1))] + newer
    for p in doomed:
        if p in newer:
            log.warning("removing %s: it is newer than the checkpoint just saved (an abandoned run)", p)
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------- resume
def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, list[Any]]:
    """``{key: [checkpoint value, current value]}`` for every TrainConfig field that differs
    (``progress``, a display flag, is ignored)."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as the checkpoint's JSON has them
    return {k: [saved.get(k), v] for k, v in now.items() if k != "progress" and k in saved and saved[k] != v}


def apply_hyperparameters(optimizer: Any, scheduler: Any, fresh_groups: list[dict[str, Any]], fresh_base: list[float]) -> None:
    """Give a restored optimizer/schedule the current config's hyperparameters (resume rule):
    each group's settings from the freshly built optimizer, the schedule's base lrs, and the lr
    ``base * factor(last_epoch)`` the schedule gives the resumed step."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)
    scheduler.base_lrs = list(fresh_base)
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ---------------------------------------------------------------------------------- loading
@dataclass
class Checkpoint:
    """A validated checkpoint folder; the ``load_*`` methods restore its parts into live objects."""

    path: Path
    step: int
    trainer_state: dict[str, Any]

    def load_model(self, module: torch.nn.Module, *, strict: bool = True) -> None:
        """Load the weights after checking every name and shape (CheckpointError names the file)."""
        load_state_into(module, self.path / WEIGHTS_FILE, strict=strict)

    def optimizer_state(self) -> dict[str, Any]:
        return unflatten_state(read_json(self.path / OPTIM_JSON), load_tensors(self.path / OPTIM_TENSORS), self.path / OPTIM_JSON)

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Load the optimizer state after checking group sizes and every state tensor's shape."""
        src = self.path / OPTIM_JSON
        state = self.optimizer_state()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved_groups = state.get("param_groups", [])
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        saved_sizes = [len(g.get("params", [])) for g in saved_groups]
        if sizes != saved_sizes:
            raise CheckpointError(
                f"{src}: optimizer parameter groups have sizes {saved_sizes} in the checkpoint but {sizes} now "
                "(different model, or different frozen parameters)"
            )
        ids = [i for g in saved_groups for i in g["params"]]
        for pos, pid in enumerate(ids):
            for key, t in state.get("state", {}).get(pid, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(params[pos].shape):
                    raise CheckpointError(
                        f"{src}: state '{key}' of parameter {pid} has shape {tuple(t.shape)}, "
                        f"the parameter has {tuple(params[pos].shape)}"
                    )
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{src}: cannot load optimizer state ({e})") from e

    def load_scheduler(self, scheduler: Any) -> None:
        scheduler.load_state_dict(unflatten_state(read_json(self.path / SCHED_JSON), {}, self.path / SCHED_JSON))

    def load_optimization(self, optimizer: Any, scheduler: Any, cfg: TrainConfig) -> dict[str, list[Any]]:
        """Load optimizer and schedule state, then apply the current ``cfg`` where it differs from the
        checkpoint's (module docstring); returns and logs the changes (:func:`config_changes`)."""
        fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        fresh_base = list(scheduler.base_lrs)
        self.load_optimizer(optimizer)
        self.load_scheduler(scheduler)
        changed = config_changes(self.trainer_state.get("config", {}), cfg)
        if changed:
            apply_hyperparameters(optimizer, scheduler, fresh_groups, fresh_base)
            for k, (old, new) in changed.items():
                log.warning("resume: %s changed %s -> %s (applied from step %d)", k, old, new, self.step + 1)
        return changed

    def rng_state(self, rank: int) -> RNGState | None:
        """The RNG state saved by process ``rank`` (None if that rank did not exist)."""
        js = read_json(self.path / RNG_JSON)
        if rank >= int(js.get("world_size", 0)):
            return None
        tensors = load_tensors(self.path / RNG_TENSORS)
        try:
            return RNGState.from_parts(tensors, js["ranks"][rank], prefix=f"rank{rank}.")
        except (KeyError, IndexError, TypeError) as e:
            raise CheckpointError(f"{self.path / RNG_JSON}: incomplete RNG state for rank {rank} ({e})") from e


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint folder (config, listed files, headers, JSON) and return it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    comp = load_component(path, kind=KIND)
    files = comp.config.get("files", [])
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (incomplete checkpoint)")
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from e
        else:
            read_json(f)
    state = read_json(path / STATE_JSON)
    if not isinstance(state, dict) or state.get("step") != comp.config.get("step"):
        raise CheckpointError(f"{path / STATE_JSON}: step does not match {path / CONFIG_FILE}")
    return Checkpoint(path=path, step=int(state["step"]), trainer_state=state)


def load_latest(out_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``out_dir/checkpoints`` (None if there is none).

    Incomplete or corrupt step folders are skipped with a warning naming the problem.
    """
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            return open_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    return None

