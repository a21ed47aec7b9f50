"""recipe_command: a recipe's flags, --config and --set derived once from its config dataclass."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from taskmoe.cli import build_app
from taskmoe.config import Config, doc
from taskmoe.errors import ConfigError
from taskmoe.training.config import TrainConfig
from taskmoe.training.recipes.command import field_info, recipe_command


@dataclass
class ToyConfig(Config):
    width: int = doc(8, "hidden width of the toy")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=30), metadata={"help": "the run"})
    again: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "a second run"})


@dataclass
class OtherConfig(Config):
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the run"})


FLAGS = {"width": "width", "steps": "train.max_steps", "seed": ("train.seed", "again.seed")}


def _double(a: dict[str, Any]) -> dict[str, Any]:
    return {} if a["twice"] is None else {"width": 2 * a["twice"]}


def _other(a: dict[str, Any]) -> Any:
    return (OtherConfig, {"steps": "train.max_steps"}) if a["other"] else None


@recipe_command(ToyConfig, FLAGS, recipe="toy", derive=_double, variant=_other,
                derived={"twice": (int, "set the width to twice this")})
def toy(run: Path, other: bool = False, progress: bool = True, *, cfg: Any) -> dict[str, Any]:
    """A toy recipe command."""
    return {"run": str(run), "progress": progress, "cfg": cfg}


def test_signature_is_typed_and_documented() -> None:
    params = inspect.signature(toy).parameters
    assert list(params) == ["run", "other", "progress", "width", "steps", "seed", "twice", "config", "set"]
    assert params["steps"].default is None and params["steps"].kind is inspect.Parameter.KEYWORD_ONLY
    assert field_info(ToyConfig, "train.max_steps")[1:] == (TrainConfig.__dataclass_fields__["max_steps"].metadata["help"], 30)
    help_ = CliRunner().invoke(build_app({"toy": toy}), ["--help"], env={"COLUMNS": "200"}).output
    assert "hidden width of the toy (default 8)" in help_ and "--set" in help_ and "--twice" in help_


def test_flags_then_sets_and_one_flag_sets_two_paths(tmp_path) -> None:
    ToyConfig(width=3).save(tmp_path / "c.json")
    cfg = toy(tmp_path, steps=7, seed=5, config=tmp_path / "c.json", set=["train.lr=0.5"])["cfg"]
    assert (cfg.width, cfg.train.max_steps, cfg.train.lr, cfg.train.seed, cfg.again.seed) == (3, 7, 0.5, 5, 5)
    assert toy(tmp_path, width=4, set=["width=6"])["cfg"].width == 6  # --set wins
    assert toy(tmp_path, twice=5)["cfg"].width == 10  # a derived flag


def test_cli_runs_the_same_command(tmp_path) -> None:
    seen = {}

    def spy(**kw: Any) -> None:
        seen.update(toy(**kw))

    spy.__signature__ = inspect.signature(toy)  # type: ignore[attr-defined]
    spy.__doc__ = toy.__doc__
    r = CliRunner().invoke(build_app({"toy": spy}), [str(tmp_path), "--steps", "3", "--set", "width=2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert seen["progress"] is False and seen["cfg"].train.max_steps == 3 and seen["cfg"].width == 2


def test_unknown_paths_and_variant_flags_are_refused(tmp_path) -> None:
    with pytest.raises(TypeError, match="names no field"):
        recipe_command(ToyConfig, {"x": "train.nope"}, recipe="toy")(toy.__wrapped__)
    with pytest.raises(ConfigError, match="--set width: cannot read 'x' as int"):
        toy(tmp_path, set=["width=x"])
    assert isinstance(toy(tmp_path, other=True, steps=2)["cfg"], OtherConfig)
    with pytest.raises(ConfigError, match=r"unknown toy \(OtherConfig\) flag\(s\) \['width'\]"):
        toy(tmp_path, other=True, width=3)
