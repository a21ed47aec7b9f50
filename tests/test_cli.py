"""The CLI contract: every command in the table parses, has help, and is a typed function."""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

from taskmoe.cli import COMMANDS, build_app

runner = CliRunner()


def test_table_is_typed_functions() -> None:
    assert COMMANDS, "the command table is empty"
    for name, fn in COMMANDS.items():
        assert callable(fn), name
        assert (fn.__doc__ or "").strip(), f"{name}: needs a docstring (it is the help text)"
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, f"{name}: parameter {p.name} has no type"


def test_top_level_help_lists_groups() -> None:
    r = runner.invoke(build_app(), ["--help"])
    assert r.exit_code == 0, r.output
    for name in COMMANDS:
        assert name.split()[0] in r.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_parses(name: str) -> None:
    r = runner.invoke(build_app(), name.split() + ["--help"])
    assert r.exit_code == 0, r.output


def test_every_group_has_a_description() -> None:
    from taskmoe.cli.table import GROUP_HELP

    groups = {name.split()[0] for name in COMMANDS if len(name.split()) > 1}
    assert groups <= set(GROUP_HELP), f"groups without help: {sorted(groups - set(GROUP_HELP))}"
