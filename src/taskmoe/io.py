"""Safe, atomic on-disk formats: JSON and safetensors only, never pickle.

A *component* (router, expert, summarizer, DOE model, ...) is a folder::

    <folder>/config.json        {"format_version", "kind", "config": {...}, "meta": {...}}
    <folder>/model.safetensors  the tensors (state dict), plus any extra named tensor files

Design choices:

- **Atomic files.** Every file is written to a temporary sibling, flushed and ``fsync``-ed, then
  ``os.replace``-d over the target, and the directory is ``fsync``-ed. A crash leaves either the
  old file or the new one, never half of one.
- **Normal permissions.** A temporary file is created the way ``open()`` creates one (mode
  ``0o666`` minus the umask) and gets that mode back after the writer ran, since some writers
  (safetensors) replace the file they are given with a new ``0600`` one.
- **Atomic folders.** :func:`save_component` builds the whole folder under a temporary name
  (``.NAME.tmp-*``) and renames it into place; an existing folder is first moved aside
  (``NAME.aside-*``) and removed only after the new one is in place. Saves into one directory hold
  that directory's save lock (``.taskmoe-save.lock``, :mod:`filelock`), so a writer that finds
  another ``.NAME.tmp-*`` or ``NAME.aside-*`` knows it was left by a dead writer and removes it:
  the next save repairs an interrupted one.
- **Loads are read-only.** They never rename or delete. A folder left between the two renames
  (``NAME`` missing, ``NAME.aside-*`` present) is read from the aside copy by
  :func:`resolve_saved` (the last committed state); :func:`load_component` on such a folder says
  to run ``taskmoe doctor``, which lists and repairs half-finished saves (:mod:`taskmoe.doctor`).
- **Loud, specific failures.** Loading checks the format version, the kind, every tensor name
  and shape, and names the file and the mismatch (a vocabulary-size mismatch says so).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from taskmoe.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ASIDE = ".aside-"  # NAME.aside-<hex>: the previous copy of NAME, moved aside during a save
TMP_DIR = ".tmp-"  # .NAME.tmp-<hex>: a component folder being built
TMP_FILE = ".tmp"  # .NAME.<hex>.tmp: a file being written
SAVE_LOCK = ".taskmoe-save.lock"  # one per directory that component folders are saved into


# ---------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically move ``tmp_path`` to ``path``.

    The temporary file lives in the target's directory so the final rename never crosses a
    filesystem. If ``write`` raises, the target is untouched and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_FILE}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the mode open() gives: 0o666 & ~umask
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # the writer may have replaced the file (safetensors makes a new 0600 one)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


# ------------------------------------------------------------------------- safetensors
def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomically write tensors to a safetensors file (contiguous CPU copies; shared storage is split)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file raises CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def check_state(
    module_state: Mapping[str, torch.Tensor],
    loaded: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    strict: bool = True,
) -> None:
    """Compare tensor names and shapes; raise CheckpointError naming each mismatch.

    A first-dimension mismatch on an embedding or output-head tensor is reported as a
    vocabulary-size mismatch, since that is what it almost always is.
    """
    problems: list[str] = []
    missing = sorted(set(module_state) - set(loaded))
    unexpected = sorted(set(loaded) - set(module_state))
    if strict and missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if strict and unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k in sorted(set(module_state) & set(loaded)):
        want, got = tuple(module_state[k].shape), tuple(loaded[k].shape)
        if want != got:
            hint = ""
            if any(s in k for s in ("embed", "wte", "head", "lm_head")) and want[1:] == got[1:] and want[:1] != got[:1]:
                hint = f" (vocabulary size mismatch: checkpoint has {got[0]}, model expects {want[0]})"
            problems.append(f"{k}: shape {got} in checkpoint vs {want} expected{hint}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_state_into(module: torch.nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load a safetensors file into ``module`` after checking every name and shape."""
    tensors = load_tensors(path)
    check_state(module.state_dict(), tensors, path, strict=strict)
    module.load_state_dict(tensors, strict=strict)


# -------------------------------------------------------------------------- components
@dataclass
class Component:
    """What :func:`load_component` returns: the parsed config.json and the folder."""

    folder: Path
    kind: str
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_FILE

    def tensors(self, name: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
        return load_tensors(self.folder / name)


def asides(folder: Path) -> list[Path]:
    """The moved-aside copies ``NAME.aside-*`` of ``folder``, newest first."""
    found = [p for p in folder.parent.glob(f"{folder.name}{ASIDE}*") if p.is_dir()] if folder.parent.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


def build_temps(folder: Path) -> list[Path]:
    """The half-built folders ``.NAME.tmp-*`` of ``folder``."""
    return sorted(folder.parent.glob(f".{folder.name}{TMP_DIR}*")) if folder.parent.is_dir() else []


def resolve_saved(root: str | Path, rel: str | Path) -> Path:
    """``root / rel``, reading through a half-finished save read-only.

    Each missing part of the path that has a moved-aside copy (``NAME.aside-*``, left by a save
    interrupted between its two renames) resolves to the newest such copy: the last committed
    state. Nothing is renamed; a warning names ``taskmoe doctor``. A path with no aside copy is
    returned as is (it may not exist).
    """
    root = Path(root)
    out = root
    for part in Path(rel).parts:
        nxt = out / part
        if not nxt.exists() and (found := asides(nxt)):
            log.warning("%s: an interrupted save left it as %s; reading that copy read-only "
                        "(repair with `taskmoe doctor %s --fix`)", nxt, found[0].name, root)
            nxt = found[0]
        out = nxt
    return out


def save_lock(directory: Path) -> Any:
    """The exclusive save lock of ``directory`` (a :class:`filelock.FileLock`; use as a context manager)."""
    from filelock import FileLock

    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory / SAVE_LOCK), is_singleton=True)  # re-entrant: a save may nest another


def save_component(
    folder: str | Path,
    kind: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor] | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Atomically write a component folder.

    ``extra_files`` maps a relative file name to a writer ``f(path)`` for anything else the
    component stores (another safetensors file, a JSON table, ``tokenizer.json``...).
    """
    def build(tmp: Path) -> None:
        if tensors is not None:
            save_tensors(tmp / WEIGHTS_FILE, tensors)
        for name, writer in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, writer)
        atomic_write_json(
            tmp / CONFIG_FILE,
            {"format_version": FORMAT_VERSION, "kind": kind, "config": dict(config), "meta": dict(meta or {})},
        )

    return atomic_dir(folder, build)


def _open_modes(root: Path) -> None:
    """Give every regular file under ``root`` the mode ``open()`` gives (0o666 minus the umask):
    writers we do not control (transformers' ``save_pretrained``, safetensors) make 0600 files."""
    probe = root / f".mode-probe{TMP_FILE}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o777 != mode:
            os.chmod(p, mode)


def atomic_dir(folder: str | Path, build: Callable[[Path], None]) -> Path:
    """Call ``build(tmp_dir)`` to fill a temporary sibling folder, then swap it in as ``folder``.

    Held under the directory's save lock. Stale half-built folders of ``folder`` (left by a writer
    that died) are removed first. An existing ``folder`` is moved aside and removed only after the
    new one is in place; a crash in between leaves the aside copy, which loads read-only and which
    the next save (or ``taskmoe doctor --fix``) cleans. If ``build`` raises, ``folder`` is untouched
    and the temporary folder removed.
    """
    folder = Path(folder)
    with save_lock(folder.parent):
        for stale in build_temps(folder):  # we hold the lock: a writer that left these is gone
            log.info("removing %s, left by an interrupted save", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.parent / f".{folder.name}{TMP_DIR}{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            _open_modes(tmp)
            _fsync_dir(tmp)
            if folder.exists():
                os.replace(folder, folder.parent / f"{folder.name}{ASIDE}{uuid.uuid4().hex[:8]}")
            os.replace(tmp, folder)
            _fsync_dir(folder.parent)
            # the copy just moved aside, and any an interrupted save left (the new folder replaces them)
            for old in asides(folder):
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def load_component(folder: str | Path, kind: str | tuple[str, ...] | None = None) -> Component:
    """Read and validate a component folder's config.json (weights are read on demand)."""
    folder = Path(folder)
    if not folder.is_dir():
        if found := asides(folder):
            raise CheckpointError(f"{folder}: not found; an interrupted save left its previous copy as {found[0].name} "
                                  f"(run `taskmoe doctor {folder.parent} --fix` to restore it)")
        raise CheckpointError(f"{folder}: component folder not found")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing config.json (not a taskmoe component folder, or a partial copy)")
    raw = read_json(cfg_path)
    if not isinstance(raw, dict) or "format_version" not in raw or "kind" not in raw:
        raise CheckpointError(f"{cfg_path}: missing 'format_version'/'kind' (not a taskmoe component config)")
    if raw["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format_version {raw['format_version']} is not supported (this taskmoe reads {FORMAT_VERSION})"
        )
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and raw["kind"] not in kinds:
        raise CheckpointError(f"{cfg_path}: holds a '{raw['kind']}', expected {' or '.join(repr(k) for k in kinds)}")
    return Component(folder=folder, kind=raw["kind"], config=raw.get("config", {}), meta=raw.get("meta", {}))
