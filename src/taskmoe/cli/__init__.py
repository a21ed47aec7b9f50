"""The ``taskmoe`` command line: one table of {command: typed function}.

Every command is an ordinary typed Python function that lives with the code it drives and
returns its result; that same function is the Python API. This module only maps names to
functions, builds a Typer app from the table (nested groups from the spaces in the names), and
prints results with :mod:`taskmoe.cli.render`. Errors derived from
:class:`taskmoe.errors.TaskmoeError` are printed as one clear line with exit code 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer

from taskmoe.cli.render import console, render
from taskmoe.cli.table import COMMANDS, GROUP_HELP
from taskmoe.errors import TaskmoeError

__all__ = ["COMMANDS", "build_app", "main"]


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            render(fn(*args, **kwargs))
        except TaskmoeError as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(code=2) from None

    return run


def build_app(commands: dict[str, Callable[..., Any]] | None = None) -> typer.Typer:
    """Build the Typer app from the command table ("route fit" -> group ``route``, command ``fit``)."""
    commands = COMMANDS if commands is None else commands
    app = typer.Typer(
        help="taskmoe: language models from separately trained specialist experts, routed per task.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    groups: dict[str, typer.Typer] = {}
    for name, fn in commands.items():
        parts = name.split()
        parent = app
        for depth, part in enumerate(parts[:-1]):
            key = " ".join(parts[: depth + 1])
            if key not in groups:
                groups[key] = typer.Typer(no_args_is_help=True, help=GROUP_HELP.get(key, f"{key} commands"))
                parent.add_typer(groups[key], name=part)
            parent = groups[key]
        doc = (fn.__doc__ or "").strip().splitlines()
        parent.command(name=parts[-1], help=(fn.__doc__ or "").strip(), short_help=doc[0] if doc else None)(_wrap(fn))
    return app


def main(argv: list[str] | None = None) -> None:
    app = build_app()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="taskmoe")
