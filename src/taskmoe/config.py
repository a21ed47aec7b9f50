"""Typed, validated dataclass configs and their JSON round trip.

Each component keeps its own small dataclass config next to its code (``models.LMConfig``,
``router.RouterConfig``, ...). They all derive from :class:`Config`, which gives:

- validation in ``__post_init__`` (subclasses override :meth:`validate` and raise
  :class:`~taskmoe.errors.ConfigError` naming the field),
- ``to_dict`` / ``from_dict`` that reject unknown keys (a typo in a config file is an error, not
  a silently ignored setting), and
- field docstrings via ``field(metadata={"help": ...})`` that double as CLI help,
- the field checks every ``validate`` shares (:func:`check_ints`, :func:`check_min`,
  :func:`check_range`, :func:`check_choice`), so a rule and its message are written once, and
- :func:`apply_overrides` / :func:`load_config`: the one way every recipe applies its CLI flags
  and ``--set path=value`` overrides (dotted paths into nested configs).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
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


# ------------------------------------------------------------------ field checks of validate()
# The common ``validate`` checks, each over several fields at once, with one message shape:
# ``"<owner>.<field> must be <rule>, got <value>"``. ``owner`` defaults to the config's class
# name; pass the section name a user writes (``owner="learned"``) where that reads better.
def _where(cfg: Any, name: str, owner: str | None) -> str:
    return f"{type(cfg).__name__ if owner is None else owner}.{name}"


def check_ints(cfg: Any, names: typing.Iterable[str], minimum: int = 1, *, owner: str | None = None) -> None:
    """Each field in ``names`` is an integer (a bool is not) with ``v >= minimum``."""
    for name in names:
        v = getattr(cfg, name)
        check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
              f"{_where(cfg, name, owner)} must be an integer >= {minimum}, got {v!r}")


def check_min(cfg: Any, names: typing.Iterable[str], minimum: float = 0, *, strict: bool = False,
              owner: str | None = None) -> None:
    """Each field in ``names`` has ``v >= minimum`` (``v > minimum`` when ``strict``)."""
    for name in names:
        v = getattr(cfg, name)
        check(v > minimum if strict else v >= minimum,
              f"{_where(cfg, name, owner)} must be {'>' if strict else '>='} {minimum}, got {v}")


def check_range(cfg: Any, names: typing.Iterable[str], low: float = 0, high: float = 1, *,
                open_low: bool = False, open_high: bool = False, owner: str | None = None) -> None:
    """Each field in ``names`` lies in the interval from ``low`` to ``high`` (closed unless
    ``open_low`` / ``open_high``); the default is the probability range ``[0, 1]``."""
    for name in names:
        v = getattr(cfg, name)
        ok = (low < v if open_low else low <= v) and (v < high if open_high else v <= high)
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        check(ok, f"{_where(cfg, name, owner)} must be in {interval}, got {v}")


def check_choice(cfg: Any, name: str, choices: typing.Collection[Any], *, owner: str | None = None) -> None:
    """Field ``name`` is one of ``choices``."""
    v = getattr(cfg, name)
    check(v in choices, f"{_where(cfg, name, owner)} must be one of {choices}, got {v!r}")


# ---------------------------------------------------------------------- dotted overrides
def _parse_value(raw: str, hint: Any, where: str) -> Any:
    """``raw`` (CLI text) as the field's type: bool/int/float/str, or JSON for lists and objects."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null"):
            return None
        if len(args) == 1:
            return _parse_value(raw, args[0], where)
        for a in args:  # e.g. ``int | str``: the first type that parses
            try:
                return _parse_value(raw, a, where)
            except ConfigError:
                continue
        return raw
    try:
        if hint is bool:
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return low in ("true", "1", "yes")
        if hint in (int, float):
            return hint(raw)
        if hint is str or hint is Any:
            return raw
        v = json.loads(raw)
        return tuple(v) if origin is tuple else v
    except ValueError as e:
        raise ConfigError(f"{where}: cannot read {raw!r} as {getattr(hint, '__name__', hint)}") from e


def apply_overrides(cfg: C, overrides: Any = (), *, source: str = "--set") -> C:
    """``cfg`` with dotted-path overrides applied; the one override helper of every recipe.

    ``overrides`` is a sequence of ``"path=value"`` strings (the CLI's repeated ``--set``, e.g.
    ``train.lr=3e-4`` or ``lm.attention.chunk_size=32``; the value is parsed as the field's type,
    lists/objects as JSON) or a mapping ``{path: value}`` of typed values (a recipe's own flags;
    ``None`` values are skipped, so an unset flag keeps the config's value). Each nested config
    is rebuilt with :meth:`Config.replace`, so every level is validated again. An unknown path
    raises :class:`ConfigError` naming it and the known fields.
    """
    if isinstance(overrides, dict):
        items = [(k, v, False) for k, v in overrides.items() if v is not None]
    else:
        items = []
        for o in overrides or ():
            key, eq, raw = str(o).partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"{source}: expected PATH=VALUE (e.g. train.lr=3e-4), got {o!r}")
            items.append((key.strip(), raw.strip(), True))
    for path, value, text in items:
        cfg = _set_path(cfg, path.split("."), value, text, f"{source} {path}")
    return cfg


def _set_path(cfg: C, parts: list[str], value: Any, text: bool, where: str) -> C:
    names = {f.name for f in dataclasses.fields(cfg) if f.init}
    head = parts[0]
    if head not in names:
        raise ConfigError(f"{where}: {type(cfg).__name__} has no field {head!r}; known: {sorted(names)}")
    current = getattr(cfg, head)
    if len(parts) > 1:
        if not isinstance(current, Config):
            raise ConfigError(f"{where}: {type(cfg).__name__}.{head} is not a config, so it has no field {parts[1]!r}")
        return cfg.replace(**{head: _set_path(current, parts[1:], value, text, where)})
    if text:
        value = _parse_value(value, typing.get_type_hints(type(cfg)).get(head, Any), where)
    return cfg.replace(**{head: value})


def load_config(cls: type[C], path: str | Path | None = None, *, flags: dict[str, Any] | None = None,
                overrides: Any = ()) -> C:
    """A recipe's config: ``cls.load(path)`` (or the defaults), then its CLI ``flags`` ({path: value},
    unset = None), then the ``--set`` ``overrides`` (which win)."""
    cfg = cls.load(path) if path is not None else cls()
    return apply_overrides(apply_overrides(cfg, flags or {}, source="flag"), overrides)


FlagPaths = typing.Union[str, tuple[str, ...]]
"""The config path a recipe flag sets, or several (``seed`` may set ``train.seed`` and ``adapter_train.seed``)."""


def config_from_flags(cls: type[C], path: str | Path | None, flag_map: dict[str, FlagPaths], flags: dict[str, Any],
                      overrides: Any = (), *, recipe: str, extra: dict[str, Any] | None = None) -> C:
    """:func:`load_config` for a recipe command: its typed CLI ``flags`` ({flag: value}, None = unset) are
    mapped to config paths by ``flag_map`` (an unknown flag raises :class:`ConfigError` naming ``recipe``
    and the known flags); ``extra`` adds paths a recipe derives from its flags; ``--set`` wins last."""
    unknown = sorted(set(flags) - set(flag_map))
    if unknown:
        raise ConfigError(f"unknown {recipe} flag(s) {unknown}; known: {sorted(flag_map)}")
    paths = {p: v for k, v in flags.items()
             for p in ((flag_map[k],) if isinstance(flag_map[k], str) else flag_map[k])}
    paths.update(extra or {})
    return load_config(cls, path, flags=paths, overrides=overrides or ())
