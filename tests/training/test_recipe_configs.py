"""Uniform recipes: the one dotted-override helper, and every recipe's config + setup/train/cleanup."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional

import pytest
from typer.testing import CliRunner

from taskmoe.config import Config, apply_overrides, load_config
from taskmoe.errors import ConfigError
from taskmoe.training.recipes.crosstalk import CrosstalkRecipeConfig
from taskmoe.training.recipes.doe import DOERecipeConfig, recipe_config
from taskmoe.training.recipes.experts import ExpertsRecipeConfig

RECIPES = {
    "router": "RouterConfig", "experts": "ExpertsRecipeConfig", "summarizer": "SummarizerRecipeConfig",
    "crosstalk": "CrosstalkRecipeConfig", "doe": "DOERecipeConfig", "sft": "SFTConfig", "dpo": "DPOConfig",
    "modality": "ModalityTrainConfig", "mixture": "MixtureRecipeConfig", "cohesion": "CohesionConfig",
}


def test_dotted_text_overrides_parse_as_the_field_type() -> None:
    cfg = apply_overrides(ExpertsRecipeConfig(), ["train.lr=3e-4", "lm.attention.chunk_size=32", "lam=0.5",
                                                  "fine_tune_embedding=true", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == 3e-4 and cfg.lm.attention.chunk_size == 32 and cfg.lam == 0.5
    assert cfg.fine_tune_embedding is True and cfg.train.betas == (0.8, 0.9)
    assert ExpertsRecipeConfig().train.lr == 1e-3  # defaults untouched (each instance owns its sub-configs)


def test_typed_flags_skip_unset_and_sets_win() -> None:
    cfg = load_config(CrosstalkRecipeConfig, flags={"train.max_steps": 7, "gan.reward": None},
                      overrides=["train.max_steps=9"])
    assert cfg.train.max_steps == 9 and cfg.gan.reward == CrosstalkRecipeConfig().gan.reward


@pytest.mark.parametrize("bad,match", [
    (["train.lrr=1"], r"TrainConfig has no field 'lrr'"),
    (["lam.x=1"], r"ExpertsRecipeConfig.lam is not a config"),
    (["lam"], r"expected PATH=VALUE"),
    (["train.max_steps=many"], r"cannot read 'many' as int"),
    (["lam=2"], r"experts.lam"),  # nested validation runs again
    (["lm.attention.normalize=true"], r"positive feature map"),
])
def test_override_errors_name_the_path(bad, match) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(ExpertsRecipeConfig(), bad)


def test_config_file_then_flags_then_sets(tmp_path) -> None:
    path = tmp_path / "doe.json"
    DOERecipeConfig(seq_len=64, prompt_len=8).save(path)
    cfg = recipe_config(path, ["model.tau=0.25"], experts=2, steps=40, d_model=None)
    assert (cfg.seq_len, cfg.prompt_len, cfg.model.tau) == (64, 8, 0.25)
    assert cfg.model.experts == ["e0", "e1"] and cfg.train.max_steps == 40 and cfg.train.warmup_steps == 2
    assert cfg.model.lm.d_model == 128
    assert DOERecipeConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_set_is_repeatable() -> None:
    from taskmoe.cli import build_app

    seen = {}

    def cmd(set: Optional[list[str]] = None) -> None:
        """A command with --set."""
        seen["cfg"] = apply_overrides(ExpertsRecipeConfig(), set or ())

    r = CliRunner().invoke(build_app({"x": cmd}), ["--set", "seq_len=16", "--set", "train.seed=3"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].seq_len == 16 and seen["cfg"].train.seed == 3


@pytest.mark.parametrize("module,config", sorted(RECIPES.items()))
def test_every_recipe_has_one_shape(module, config) -> None:
    mod = importlib.import_module(f"taskmoe.training.recipes.{module}")
    for step in ("setup", "train", "cleanup"):
        assert callable(getattr(mod, step, None)), f"recipes/{module}.py has no {step}()"
    cls = getattr(mod, config) if hasattr(mod, config) else getattr(importlib.import_module("taskmoe.router.fit"), config)
    assert issubclass(cls, Config)

    def walk(c: type, where: str) -> None:
        for f in dataclasses.fields(c):
            assert f.metadata.get("help"), f"{where}.{f.name} has no help text"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(default, Config):
                walk(type(default), f"{where}.{f.name}")

    walk(cls, cls.__name__)


def test_one_public_train_summarizer() -> None:
    from taskmoe.cli.table import COMMANDS
    from taskmoe.training.recipes import summarizer, summarizer_run

    assert not hasattr(summarizer, "train_summarizer")
    assert COMMANDS["train summarizer"] is summarizer_run.train_summarizer


TRAINING_COMMANDS = ["train experts", "train summarizer", "train crosstalk", "train doe", "train sft", "train dpo",
                     "train modality", "train mixture", "cohesion"]


@pytest.mark.parametrize("name", TRAINING_COMMANDS)
def test_every_training_command_takes_config_and_set(name) -> None:
    import inspect

    from taskmoe.cli.table import COMMANDS

    params = inspect.signature(COMMANDS[name]).parameters
    assert "config" in params and "set" in params, f"`taskmoe {name}` lacks --config or --set"


def test_chat_flags_then_sets(tmp_path) -> None:
    from taskmoe.config import config_from_flags
    from taskmoe.training.recipes.chat import FLAGS as CHAT_FLAGS
    from taskmoe.training.recipes.dpo import FLAGS as DPO_FLAGS, DPOConfig
    from taskmoe.training.recipes.sft import SFTConfig

    def build(cls, path, sets, flag_map=CHAT_FLAGS, **flags):
        return config_from_flags(cls, path, flag_map, flags, sets, recipe=cls.__name__)

    path = tmp_path / "sft.json"
    SFTConfig(max_len=64).save(path)
    cfg = build(SFTConfig, path, ["train.warmup_steps=3", "lora_alpha=4"], steps=7, lr=None, progress=False)
    assert (cfg.max_len, cfg.train.max_steps, cfg.train.warmup_steps, cfg.lora_alpha) == (64, 7, 3, 4.0)
    assert cfg.train.lr == SFTConfig().train.lr and cfg.train.progress is False
    d = build(DPOConfig, None, ["beta=0.3"], DPO_FLAGS, beta=0.2, label_smoothing=0.1)
    assert (d.beta, d.label_smoothing) == (0.3, 0.1)
    with pytest.raises(ConfigError, match=r"unknown SFTConfig flag\(s\) \['beta'\]"):
        build(SFTConfig, None, None, beta=0.2)
    with pytest.raises(ConfigError, match="beta must be > 0"):
        build(DPOConfig, None, ["beta=0"], DPO_FLAGS)


def test_mixture_flags_derive_the_schedule_and_sets_win() -> None:
    from taskmoe.config import config_from_flags
    from taskmoe.training.recipes.mixture import FLAGS, MixtureRecipeConfig

    d = MixtureRecipeConfig()
    assert (d.train.max_steps, d.train.warmup_steps, d.train.save_every, d.pruning.window) == (100, 10, 25, 10)
    cfg = config_from_flags(MixtureRecipeConfig, None, FLAGS, {"steps": 8, "min_weight": 0.3, "window": None},
                            ["pruning.keep_at_least=2"], recipe="mixture",
                            extra={"train.warmup_steps": 0, "train.save_every": 2})
    assert (cfg.train.max_steps, cfg.pruning.min_weight, cfg.pruning.keep_at_least) == (8, 0.3, 2)
    assert cfg.pruning.window == 10


def test_cohesion_file_then_quick_then_sets(tmp_path) -> None:
    from taskmoe.training.recipes.cohesion import CohesionConfig, build_config

    path = tmp_path / "c.json"
    CohesionConfig(seq_len=512, lora_rank=4).save(path)
    cfg = build_config(path, ["sft.max_steps=5", "beta=0.2"], quick=True)
    assert (cfg.seq_len, cfg.lora_rank, cfg.beta) == (128, 4, 0.2)
    assert (cfg.sft.max_steps, cfg.legal.max_steps, cfg.dpo.max_steps) == (5, 3, 3)
    with pytest.raises(ConfigError, match="CohesionConfig has no field 'lr'"):
        build_config(None, ["lr=1"])


def test_modality_config_file_and_sets_reach_the_run(tmp_path, monkeypatch) -> None:
    from taskmoe.training.recipes import modality
    from taskmoe.training.recipes.modality import ModalityTrainConfig

    seen = {}

    def fake_setup(cfg):  # stop before loading a model: only the config is under test
        seen["cfg"] = cfg
        raise RuntimeError("stop")

    monkeypatch.setattr(modality, "setup", fake_setup)
    path = tmp_path / "m.json"
    ModalityTrainConfig(kind="audio", steps=5).save(path)
    with pytest.raises(RuntimeError, match="stop"):
        modality.train_modality(config=path, lr=1e-2, head_init=0.5, set=["gate_weight=0.5", "min_lr_ratio=0"],
                                 progress=False)
    cfg = seen["cfg"]
    assert (cfg.kind, cfg.steps, cfg.lr, cfg.gate_weight, cfg.progress) == ("audio", 5, 1e-2, 0.5, False)
    assert cfg.head_init == 0.5 and cfg.min_lr_ratio == 0.0
    with pytest.raises(ConfigError, match="head_init > 0 and 0 <= min_lr_ratio <= 1 needed"):
        ModalityTrainConfig(head_init=0.0)
    assert cfg.base == ModalityTrainConfig().base
