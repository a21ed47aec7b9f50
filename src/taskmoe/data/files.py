"""The files of a source folder, once for the folder sources of :mod:`taskmoe.data`.

:func:`folder_files` lists the regular files under a folder that match a glob pattern, sorted by
path (so every read is in the same order), and raises :class:`~taskmoe.errors.DataError` naming
the folder when it is missing or gives no files.
"""

from __future__ import annotations

from pathlib import Path

from taskmoe.errors import DataError


def folder_files(root: str | Path, pattern: str, what: str, empty: str) -> list[Path]:
    """Sorted files of ``root`` matching ``pattern``; errors read ``"{root}: {what} folder not found"``
    and ``"{root}: {empty}"``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {what} folder not found")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"{root}: {empty}")
    return files
