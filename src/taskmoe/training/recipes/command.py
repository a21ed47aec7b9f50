"""Recipe CLI commands whose config flags come from the config dataclass: one option set for every recipe.

A recipe command is written as ``body(<its own arguments>, *, cfg)``: the arguments that are not config
fields (the run folder, a data file, ``--source`` ...) plus the built config. :func:`recipe_command`
turns it into the typed function of :mod:`taskmoe.cli.table`, which is also the Python API:

- every entry of the recipe's ``FLAGS`` map ``{flag: config path}`` becomes a keyword parameter typed
  ``Optional[<the field's type>] = None`` (None = keep the config's value) whose CLI help is the
  field's ``doc(...)`` help, with the config's default;
- every command gets ``--config FILE.json`` (the config to start from) and ``--set PATH=VALUE``
  (repeatable, dotted paths, applied last), through :func:`taskmoe.config.config_from_flags`;
- a flag the body takes itself (``progress``, ``seed``) keeps the body's type and default; its value
  also sets the config path(s) unless it is left at that default (then the config file's value stands);
- ``derive(args)`` adds config paths computed from the arguments (e.g. the warm-up from ``--steps``);
- a ``Path`` given (from Python) for a ``str`` field is stored as its text, so the config stays JSON.

So a flag is named once (``FLAGS``), typed and documented once (its config field), and the
"load the config, apply the flags, apply ``--set``, validate" plumbing is written once (here), as in
torchtune, where every recipe is a config plus setup / train / cleanup and one helper applies overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional

import typer

from taskmoe.config import C, Config, FlagPaths, config_from_flags

__all__ = ["recipe_command", "field_info"]

_KW = inspect.Parameter.KEYWORD_ONLY
CONFIG_HELP = "a JSON file of the recipe's config to start from (the flags given apply on top of it)"
SET_HELP = "PATH=VALUE (repeatable): set any config field by its dotted path, e.g. train.lr=3e-4; applied last"


def field_info(cls: type[Config], path: str) -> tuple[Any, str, Any]:
    """(type, help, default) of the field at dotted ``path`` of ``cls`` (defaults from ``cls()``)."""
    owner: Any = cls
    value: Any = cls()
    hint: Any = Any
    help_ = ""
    for part in path.split("."):
        fields = {f.name: f for f in dataclasses.fields(owner)}
        if part not in fields:
            raise TypeError(f"{cls.__name__}: flag path {path!r} names no field ({part!r})")
        hint = typing.get_type_hints(owner)[part]
        help_ = fields[part].metadata.get("help", "")
        value = getattr(value, part)
        owner = type(value)
    return hint, help_, value


def _flag_parameter(cls: type[Config], name: str, paths: FlagPaths) -> inspect.Parameter:
    first = paths if isinstance(paths, str) else paths[0]
    hint, help_, default = field_info(cls, first)
    shown = f" (default {default!r})" if default is not None and not isinstance(default, Config) else ""
    return inspect.Parameter(name, _KW, default=None,
                             annotation=Annotated[Optional[hint], typer.Option(help=f"{help_}{shown}")])


Variant = Callable[[dict[str, Any]], "tuple[type[Config], Mapping[str, FlagPaths]] | None"]


def recipe_command(cls: type[C], flags: Mapping[str, FlagPaths], *, recipe: str,
                   derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                   variant: Variant | None = None,
                   derived: Mapping[str, tuple[Any, str]] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``body(..., *, cfg)`` -> the recipe command with ``flags``, ``--config`` and ``--set``.

    ``flags`` maps a flag name to the config path (or paths) it sets; ``recipe`` names the recipe in
    errors; ``derive`` gets every argument by name (flags as given, None = unset) and returns more
    ``{path: value}`` to set. ``variant`` (same argument) may return another ``(config class, flags)``
    for this call (``train experts --backbone`` builds an adapter-experts config): the flags it does
    not know must then be unset, else :class:`~taskmoe.errors.ConfigError` names them. ``derived``
    declares flags that are no config path (``{name: (type, help)}``, None = unset): only ``derive``
    reads them (``train doe --experts N`` names N experts).
    """
    derived = dict(derived or {})

    def wrap(body: Callable[..., Any]) -> Callable[..., Any]:
        own = {n: p for n, p in inspect.signature(body, eval_str=True).parameters.items() if n != "cfg"}
        own_defaults = {n: p.default for n, p in own.items()}
        params = [p for p in own.values() if p.kind is not _KW]
        params += [p for p in own.values() if p.kind is _KW]
        params += [_flag_parameter(cls, name, paths) for name, paths in flags.items() if name not in own]
        params += [inspect.Parameter(name, _KW, default=None, annotation=Annotated[Optional[t], typer.Option(help=h)])
                   for name, (t, h) in derived.items()]
        params += [inspect.Parameter("config", _KW, default=None,
                                     annotation=Annotated[Optional[Path], typer.Option(help=CONFIG_HELP)]),
                   inspect.Parameter("set", _KW, default=None,
                                     annotation=Annotated[Optional[list[str]], typer.Option(help=SET_HELP)])]
        sig = inspect.Signature(params, return_annotation=inspect.signature(body, eval_str=True).return_annotation)
        text = {name for name, paths in flags.items()  # a path given for a str field is kept as its text
                if field_info(cls, paths if isinstance(paths, str) else paths[0])[0] in (str, Optional[str])}

        @functools.wraps(body)
        def command(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            given = {name: (None if a[name] == own_defaults[name] else a[name]) if name in own else a.pop(name)
                     for name in flags}
            given = {k: os.fspath(v) if k in text and isinstance(v, os.PathLike) else v for k, v in given.items()}
            args = {**a, **given}
            for name in derived:
                del a[name]
            config, overrides = a.pop("config"), a.pop("set")
            chosen = variant(args) if variant is not None else None
            cls_, map_ = (cls, flags) if chosen is None else chosen
            given = {k: v for k, v in given.items() if k in map_ or v is not None}
            extra = derive(args) if derive is not None else None
            label = recipe if chosen is None else f"{recipe} ({cls_.__name__})"
            cfg = config_from_flags(cls_, config, dict(map_), given, overrides or (), recipe=label, extra=extra)
            return body(**a, cfg=cfg)

        command.__signature__ = sig  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": sig.return_annotation}
        return command

    return wrap
