"""Turn a command's return value into terminal output (tables via rich).

Commands are plain typed functions that *return* their result (that is the Python API); the CLI
prints it here. A result may provide ``__rich__`` (a rich renderable), be a mapping (shown as a
two-column table), a list of mappings (a table with one row each), a Path (printed as where the
output was written), or anything else (printed as is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

console = Console()


def table_from_rows(rows: list[Mapping[str, Any]], title: str | None = None) -> Table:
    t = Table(title=title)
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    for c in cols:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[_fmt(r.get(c, "")) for c in cols])
    return t


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(result: Any) -> None:
    if result is None:
        return
    if hasattr(result, "__rich__") or isinstance(result, Table):
        console.print(result)
    elif isinstance(result, Mapping):
        t = Table(show_header=False)
        t.add_column("key")
        t.add_column("value")
        for k, v in result.items():
            t.add_row(str(k), _fmt(v))
        console.print(t)
    elif isinstance(result, list) and result and all(isinstance(r, Mapping) for r in result):
        console.print(table_from_rows(result))
    elif isinstance(result, Path):
        console.print(f"written: {result}")
    else:
        console.print(result)
