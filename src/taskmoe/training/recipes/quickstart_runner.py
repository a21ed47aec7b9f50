"""The quickstart's stage runner, shared by the from-scratch and the backbone quickstarts.

:class:`_Stages` runs named stages in order (a header line, skip when the stage's output exists,
wall and process-CPU seconds, one row per stage, state saved after each); :func:`_prepare_run`
checks the run folder (only a folder quickstart created, recognised by ``quickstart.json``, may be
deleted by ``--force``; resuming with another preset or other sizes is an error).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

from taskmoe.config import Config
from taskmoe.errors import ConfigError
from taskmoe.io import atomic_write_json, read_json

STATE_FILE = "quickstart.json"


class _Stages:
    """Runs stages in order: header line, skip when done, time, one row each."""

    def __init__(self, names: list[str], console: Any, state: dict[str, Any], save: Callable[[], None]) -> None:
        self.names, self.console, self.state, self.save = names, console, state, save
        self.rows: list[dict[str, Any]] = []
        self.ran_any = False

    @classmethod
    def open(cls, out: Path, cfg: Config, preset: str, force: bool, names: list[str], console: Any,
             **extra: Any) -> "_Stages":
        """The runner of run folder ``out``: checked by :func:`_prepare_run`, ``extra`` added to its state,
        the state saved (atomically, to ``quickstart.json``) now and after every stage."""
        state = _prepare_run(out, cfg, preset, force)
        state.update(extra)
        st = cls(names, console, state, lambda: atomic_write_json(out / STATE_FILE, state))
        st.save()
        return st

    def say(self, msg: str) -> None:
        """One plain line on the console (no rich markup)."""
        self.console.print(msg, markup=False, highlight=False)

    def __call__(self, name: str, done: Callable[[], bool], fn: Callable[[], str], *, always_after_change: bool = False,
                 changes: bool = True) -> None:
        """Run stage ``name`` unless ``done()``; ``always_after_change`` reruns it when an earlier stage
        that ``changes`` outputs ran in this call (loading the corpus changes nothing)."""
        i = self.names.index(name) + 1
        prev = self.state.setdefault("stages", {}).get(name, {})
        if done() and not (always_after_change and self.ran_any):
            self.console.print(f"[dim][{i}/{len(self.names)}] {name}: done earlier, skipped[/]")
            self.rows.append({"stage": name, "status": "skipped", "seconds": 0.0, "cpu_seconds": 0.0,
                              "detail": prev.get("detail", "") + (f" (took {prev['seconds']:.0f} s)" if "seconds" in prev else "")})
            return
        self.console.rule(f"[bold][{i}/{len(self.names)}] {name}")
        t0, c0 = time.perf_counter(), time.process_time()
        detail = fn()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.ran_any = self.ran_any or changes
        self.state["stages"][name] = {"seconds": round(dt, 2), "cpu_seconds": round(cpu, 2), "detail": detail}
        self.save()
        self.rows.append({"stage": name, "status": "ran", "seconds": dt, "cpu_seconds": cpu, "detail": detail})



def _prepare_run(out: Path, cfg: Config, preset: str, force: bool) -> dict[str, Any]:
    """Check (or with ``force`` delete) the run folder and return its state (``quickstart.json``)."""
    state_path = out / STATE_FILE
    if force and out.exists():
        if not state_path.is_file():
            raise ConfigError(f"{out}: refusing to delete a folder quickstart did not create (no {STATE_FILE}); "
                              "choose another --out")
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()) and not state_path.is_file():
        raise ConfigError(f"{out}: folder exists and is not a quickstart run (no {STATE_FILE}); choose another --out")
    state: dict[str, Any] = read_json(state_path) if state_path.is_file() else {}
    if state and (state.get("config") != cfg.to_dict() or state.get("preset", preset).split("+")[0] != preset.split("+")[0]):
        raise ConfigError(f"{state_path}: this folder was built with preset {state.get('preset')!r} and different sizes; "
                          f"rerun with --force to rebuild it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    state.update({"preset": preset, "config": cfg.to_dict()})
    return state
