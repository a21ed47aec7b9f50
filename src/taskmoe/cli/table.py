"""The command table. Add a command by importing its function and adding one line."""

from __future__ import annotations

from typing import Any, Callable

from taskmoe.data.commands import data_build, data_stats, tokenizer_train

COMMANDS: dict[str, Callable[..., Any]] = {
    "data stats": data_stats,
    "data build": data_build,
    "tokenizer train": tokenizer_train,
}
