"""The LR schedule's shape, AdamW parameter groups, and the lr actually used per step."""

from __future__ import annotations

import json

import pytest
from torch import nn

from taskmoe.errors import ConfigError
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train
from taskmoe.training.optim import build_optimizer, lr_factor, param_groups
from train_helpers import AffineSequences, TinyLM, lm_loss


def test_lr_factor_warmup_then_cosine_to_min():
    """W=3, S=14, m=0.1: warmup 1/3, 2/3, 1; cosine p = (s-3)/10: s=3 -> 1, s=8 -> p=.5 ->
    0.1 + 0.9 * 0.5 = 0.55, s=13 (last) -> 0.1; beyond the end it stays at 0.1."""
    f = [lr_factor(s, 3, 14, 0.1) for s in range(16)]
    assert f[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert f[8] == pytest.approx(0.55)
    assert f[13] == pytest.approx(0.1) and f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))  # non-increasing after warmup
    assert lr_factor(0, 0, 10, 0.0) == 1.0 and lr_factor(9, 0, 10, 0.0) == pytest.approx(0.0)


def test_loop_uses_the_scheduled_lr_at_every_step(tmp_path):
    cfg = TrainConfig(max_steps=8, batch_size=2, lr=0.02, warmup_steps=2, min_lr_ratio=0.25, log_every=1,
                      save_every=0, eval_every=0, progress=False)  # fmt: skip
    train(TinyLM(), lm_loss, AffineSequences(16), cfg, out_dir=tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["lr"] for r in recs] == pytest.approx([0.02 * lr_factor(s, 2, 8, 0.25) for s in range(8)])
    assert recs[-1]["lr"] == pytest.approx(0.02 * 0.25)


def test_no_weight_decay_on_norms_biases_embeddings_and_tied_heads():
    model = TinyLM()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["head.weight", "mlp.weight"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "embed.weight", "head.bias", "mlp.bias", "norm.bias", "norm.weight"]  # fmt: skip

    tied = TinyLM()
    tied.head.weight = tied.embed.weight  # a head tied to the embedding is not decayed, and counted once
    groups = param_groups(tied, 0.1)
    assert [n for n, p in tied.named_parameters() if any(p is q for q in groups[0]["params"])] == ["mlp.weight"]
    assert sum(len(g["params"]) for g in groups) == len(list(tied.parameters()))


def test_only_trainable_parameters_reach_the_optimizer():
    model = TinyLM()
    for p in model.embed.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.embed.weight) not in ids and len(ids) == len(list(model.parameters())) - 1
    with pytest.raises(ConfigError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1)


def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="TrainConfig.grad_accum must be >= 1, got 0"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        TrainConfig(mixed_precision="fp16")
    cfg = TrainConfig.from_dict(TrainConfig(betas=(0.8, 0.99)).to_dict())
    assert cfg.betas == (0.8, 0.99) and cfg == TrainConfig(betas=(0.8, 0.99))
    with pytest.raises(ConfigError, match="unknown field"):
        TrainConfig.from_dict({"max_step": 3})
