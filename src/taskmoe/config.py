"""Typed, validated dataclass configs and their JSON round trip.

Each component keeps its own small dataclass config next to its code (``models.LMConfig``,
``router.RouterConfig``, ...). They all derive from :class:`Config`, which gives:

- validation in ``__post_init__`` (subclasses override :meth:`validate` and raise
  :class:`~taskmoe.errors.ConfigError` naming the field),
- ``to_dict`` / ``from_dict`` that reject unknown keys (a typo in a config file is an error, not
  a silently ignored setting), and
- field docstrings via ``field(metadata={"help": ...})`` that double as CLI help.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from taskmoe.errors import ConfigError

C = TypeVar("C", bound="Config")


def doc(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a help string (shown by the CLI and in docs).

    A mutable default (list, dict, set, or a nested :class:`Config` such as
    ``doc(TrainConfig(max_steps=300), "the training run")``) becomes a ``default_factory`` that
    hands every instance its own copy.
    """
    if isinstance(default, (list, dict, set, Config)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass
class Config:
    """Base of every config: validation, strict dict/JSON round trip."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Raise ConfigError if a field is out of range. Subclasses extend this."""

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else v
        return out

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any], *, source: str = "config") -> C:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object for {cls.__name__}, got {type(d).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            t = hints.get(k)
            if isinstance(t, type) and issubclass(t, Config) and isinstance(v, dict):
                v = t.from_dict(v, source=f"{source}.{k}")
            elif isinstance(v, list) and t is not None and typing.get_origin(t) is tuple:
                v = tuple(v)
            kwargs[k] = v
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from e

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        from taskmoe.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        from taskmoe.io import read_json

        return cls.from_dict(read_json(path), source=str(path))


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond holds. Used by ``validate`` methods."""
    if not cond:
        raise ConfigError(msg)
