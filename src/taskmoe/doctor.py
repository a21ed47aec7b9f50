"""``taskmoe doctor RUN``: find, and with ``--fix`` repair, what interrupted saves left in a folder.

Loads never rename or delete (:mod:`taskmoe.io`); repairs happen in the writer (the next save of
a component removes its leftovers) and here, explicitly. The doctor walks ``RUN`` (a run folder,
or any folder holding components or checkpoints) and reports:

- ``half-saved``: ``NAME`` is missing and ``NAME.aside-*`` holds its previous copy (a save was
  interrupted between its two renames). Loads read the aside copy read-only; the fix restores it
  as ``NAME`` (the last committed state; the interrupted new copy, if any, is a temp folder).
- ``stale aside``: ``NAME`` exists and an old ``NAME.aside-*`` is still there (a save was
  interrupted after its second rename). Fix: remove the aside copy.
- ``stale temp folder``: ``.NAME.tmp-*``, a component folder whose save never finished. Fix:
  remove it.
- ``stale temp file``: ``.NAME.<hex>.tmp``, a file whose atomic write never finished. Files
  younger than ``min_age`` seconds may belong to a live write and are only listed.
- ``manifest``: when ``RUN/taskmoe.json`` exists, the read-only manifest check
  (:func:`taskmoe.manifest.load_manifest`) and its error, if any (not fixable here).

Design choices: the default is a dry run (it lists, changes nothing), because the doctor's fixes
delete files; ``--fix`` repairs. Folder repairs hold the directory's save lock
(:func:`taskmoe.io.save_lock`), the one every component save holds, so the doctor never races a
live save. Nothing inside an aside or temp folder is inspected (it is whole or it is removed).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from taskmoe.errors import CheckpointError
from taskmoe.io import ASIDE, SAVE_LOCK, TMP_DIR, TMP_FILE, asides, save_lock
from taskmoe.manifest import MANIFEST_FILE, load_manifest

__all__ = ["Finding", "diagnose", "repair", "doctor"]


@dataclass
class Finding:
    """One problem: its ``path``, ``problem`` (see the module docstring) and the ``action`` a fix takes."""

    path: str
    problem: str
    action: str
    fixed: bool = False


def _leftover(name: str) -> bool:
    return ASIDE in name or (name.startswith(".") and (TMP_DIR in name or name.endswith(TMP_FILE)))


def diagnose(root: str | Path, *, min_age: float = 600.0) -> list[Finding]:
    """Every leftover of an interrupted save under ``root`` (read-only; module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: folder not found")
    found: list[Finding] = []
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _leftover(d))  # never walk into a leftover
        for name in sorted(os.listdir(here)):
            p = here / name
            if name == SAVE_LOCK or not _leftover(name):
                continue
            if ASIDE in name and p.is_dir():
                target = here / name.split(ASIDE)[0]
                if target.exists():
                    found.append(Finding(str(p), "stale aside", "remove"))
                elif asides(target)[0] == p:
                    found.append(Finding(str(p), "half-saved", f"restore as {target.name}"))
                else:
                    found.append(Finding(str(p), "stale aside", "remove (an older copy than the one restored)"))
            elif TMP_DIR in name and p.is_dir():
                found.append(Finding(str(p), "stale temp folder", "remove"))
            elif name.endswith(TMP_FILE) and p.is_file():
                young = now - p.stat().st_mtime < min_age
                found.append(Finding(str(p), "stale temp file",
                                     f"keep (younger than {min_age:g} s: may be a live write)" if young else "remove"))
    if (root / MANIFEST_FILE).is_file():
        try:
            load_manifest(root)
        except CheckpointError as e:
            found.append(Finding(str(root / MANIFEST_FILE), "manifest", f"not fixable here: {e}"))
    return found


def repair(findings: list[Finding]) -> list[Finding]:
    """Apply each finding's action (under the directory's save lock for folders); marks ``fixed``."""
    for f in findings:
        p = Path(f.path)
        if f.problem == "manifest" or f.action.startswith("keep"):
            continue
        if not p.exists():  # already repaired (e.g. by a save that ran meanwhile)
            f.fixed = True
            continue
        if p.is_file():
            p.unlink(missing_ok=True)
        else:
            with save_lock(p.parent):
                if f.problem == "half-saved" and not (target := p.parent / p.name.split(ASIDE)[0]).exists():
                    os.replace(p, target)
                elif p.exists():
                    shutil.rmtree(p)
        f.fixed = True
    return findings


def doctor(run: Path, fix: bool = False, min_age: float = 600.0) -> list[dict]:
    """List what interrupted saves left in RUN (half-renamed components, stale temp folders and files);
    --fix repairs them.

    Without --fix this is a dry run: nothing changes. A half-saved component (NAME missing,
    NAME.aside-* present) is restored from its previous copy; stale NAME.aside-* copies and
    .NAME.tmp-* folders are removed; temp files younger than --min-age seconds are kept (they
    may belong to a write in progress). Also reports whether RUN/taskmoe.json validates.
    """
    run = Path(run)
    findings = diagnose(run, min_age=min_age)
    if fix:
        # restore half-saved folders before removing anything
        repair(sorted(findings, key=lambda f: f.problem != "half-saved"))
    rows = [{**asdict(f), "path": str(Path(f.path).relative_to(run)) if Path(f.path).is_relative_to(run) else f.path}
            for f in findings]
    if not rows:
        return [{"path": str(run), "problem": "none", "action": "nothing to do", "fixed": False}]
    return rows
