"""The command table. Add a command by importing its function and adding one line."""

from __future__ import annotations

from typing import Any, Callable

COMMANDS: dict[str, Callable[..., Any]] = {}
