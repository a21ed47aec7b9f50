"""Backbone systems: a router on a tiny random Llama, LoRA experts trained on the shared loop,
saved in PEFT's layout, loaded lazily by ``taskmoe.load`` (no real backbone needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "backbones"))
from backbone_helpers import backbone_experts_run, write_hf_backbone  # noqa: E402

import taskmoe  # noqa: E402
from taskmoe.errors import CheckpointError, ConfigError  # noqa: E402
from taskmoe.experts.adapter_expert import AdapterExpert  # noqa: E402
from taskmoe.io import read_json  # noqa: E402


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bbrun")
    run = root / "run"
    hf, rows = backbone_experts_run(root, run)
    return root, run, hf, rows


def test_experts_are_peft_folders_registered_with_the_backbone(backbone_run):
    root, run, _, rows = backbone_run
    assert [r["expert"] for r in rows] == ["c0", "c1"] and all(r["steps"] == 3 for r in rows)
    m = read_json(run / "taskmoe.json")
    assert m["meta"]["backbone"] == str((root / "backbone").resolve()) and m["experts"] == {"0": "experts/c0", "1": "experts/c1"}
    for n in ("c0", "c1"):
        files = sorted(p.name for p in (run / "experts" / n).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert not any(p.stat().st_size > 2_000_000 for p in (run / "train").rglob("*.safetensors"))  # adapter-only checkpoints


def test_peft_loads_an_expert_with_the_same_logits(backbone_run):
    peft = pytest.importorskip("peft")
    root, run, hf, _ = backbone_run
    system = taskmoe.load(run)
    expert = system.store.get("c0")
    assert isinstance(expert, AdapterExpert)
    ids = torch.tensor([[5, 17, 40, 99, 3, 250]])
    ours = expert(ids).logits
    theirs = peft.PeftModel.from_pretrained(hf, str(run / "experts" / "c0")).eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    base = system.store.get("c1").base(ids).logits  # the shared backbone's own forward has no adapter on
    assert (ours - base).abs().max().item() > 0


def test_loaded_backbone_system_answers_with_a_trace_and_loads_lazily(backbone_run):
    _, run, _, _ = backbone_run
    system = taskmoe.load(run, max_experts=1)
    assert system.store.stats().resident == []
    a = system.generate("the quick brown fox", max_new_tokens=4)
    assert a.trace.mode == "ensemble" and a.trace.experts and a.trace.experts[0].name in ("c0", "c1")
    assert len(system.store.stats().resident) == 1 and system.store.stats().resident_bytes < 200_000
    again = system.generate("the quick brown fox", max_new_tokens=4)
    assert again.text == a.text


def test_missing_backbone_is_a_clear_error(backbone_run, tmp_path):
    import json
    import shutil

    root, run, _, _ = backbone_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    m = read_json(copy / "taskmoe.json")
    m["meta"]["backbone"] = "../no-such-backbone"
    (copy / "taskmoe.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="meta.backbone"):
        taskmoe.load(copy)


def test_experts_add_registers_a_peft_adapter_trained_elsewhere(backbone_run, tmp_path):
    import shutil

    peft = pytest.importorskip("peft")
    from taskmoe.training.recipes.backbone_experts import experts_add

    root, run, hf, _ = backbone_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    torch.manual_seed(3)
    pm = peft.get_peft_model(write_hf_backbone(tmp_path / "hf"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(str(tmp_path / "elsewhere"))
    row = experts_add("mine", tmp_path / "elsewhere", run=copy, category="c1")
    assert row["replaced"] == "experts/c1" and row["r"] == 2
    assert read_json(copy / "taskmoe.json")["experts"]["1"] == "experts/mine"
    system = taskmoe.load(copy)
    ids = torch.tensor([[7, 8, 9, 10]])
    assert (system.store.get("mine")(ids).logits - pm.eval()(ids).logits).abs().max().item() < 1e-4

    with pytest.raises(ConfigError, match="not a router category"):
        experts_add("x", tmp_path / "elsewhere", run=copy, category="c9")
    wide = peft.get_peft_model(write_hf_backbone(tmp_path / "hf2", hidden_size=96, intermediate_size=128),
                               peft.LoraConfig(r=2, target_modules=["q_proj"]))
    wide.save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(CheckpointError, match="do not fit"):
        experts_add("wide", tmp_path / "wide", run=copy, category="c0")
    assert not (copy / "experts" / "wide").exists()
