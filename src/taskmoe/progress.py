"""The one progress bar of taskmoe (rich, on stderr), for data work, evaluation and the train loop.

Design choices:

- **Same behaviour everywhere.** A bar draws only when it is enabled *and* stderr is a terminal;
  otherwise (a log file, a pipe, CI, a test runner capturing output) it draws nothing at all, so
  logs never fill with bar frames and a run's output does not depend on who calls it. The
  returned object has the same API either way (``add_task``, ``advance``, ``update``), so callers
  never branch on it.
- **One layout**: description, bar, done/total, elapsed and remaining time, plus the caller's
  ``fields`` (rich format strings over ``task.fields``, e.g. ``"loss {task.fields[loss]}"``).
- It lives at the bottom of the package (beside ``config``/``io``/``errors``) so every layer,
  ``data/`` included, may use it.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["progress_bar", "draws"]


def draws(enabled: bool, console: Console | None = None) -> bool:
    """Whether a bar with this ``enabled`` flag draws: enabled and stderr (or ``console``) is a terminal."""
    return bool(enabled) and (console or Console(stderr=True)).is_terminal


def progress_bar(enabled: bool = True, *, fields: Sequence[str] = ()) -> Progress:
    """A rich ``Progress`` (use it as a context manager); silent unless :func:`draws` says otherwise."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not draws(enabled, console),
    )
