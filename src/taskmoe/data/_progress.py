"""A rich progress bar on stderr for long data work (reading corpora, tokenizing).

One helper so every data step shows the same bar and can be silenced the same way
(``enabled=False`` in tests and library calls that want quiet output).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(enabled: bool = True) -> Progress:
    """A Progress (use as a context manager); draws nothing when ``enabled`` is False."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
