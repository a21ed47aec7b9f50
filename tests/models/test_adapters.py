"""PEFT-layout adapters on our backbone: ours -> peft and peft -> ours give the same logits as the other
library, the files carry PEFT's names and fields, and what does not fit is refused clearly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "backbones"))
from backbone_helpers import VOCAB, write_hf_backbone  # noqa: E402

from taskmoe.errors import CheckpointError, ConfigError  # noqa: E402
from taskmoe.layers.lora import lora_layers, use_adapter  # noqa: E402
from taskmoe.models.adapters import DEFAULT_TARGETS, inject_adapter, load_adapter, save_adapter  # noqa: E402
from taskmoe.models.backbones import load_backbone  # noqa: E402

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "tiny"
    write_hf_backbone(d, tie=False)
    return d


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True).eval()


def _randomize(model: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.specs:
                layer.lora_B[name].normal_(0, 0.05)


IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))


def test_ours_saved_opens_in_peft_with_the_same_logits(folder: Path, tmp_path: Path) -> None:
    ours, _ = load_backbone(folder)
    wrapped = inject_adapter(ours, "legal", r=4, alpha=8.0)
    assert len(wrapped) == 7 * 2 and wrapped[0] == "blocks.0.mixer.q_proj"
    _randomize(ours, "legal")
    out = save_adapter(ours, "legal", tmp_path / "legal", base_model_name_or_path=str(folder))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8.0 and sorted(cfg["target_modules"]) == sorted(DEFAULT_TARGETS)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 28
    theirs = peft.PeftModel.from_pretrained(_hf(folder), str(out)).eval()
    with torch.no_grad():
        want = theirs(IDS).logits
        with use_adapter(ours, "legal"):
            got = ours(IDS).logits
        with use_adapter(ours, None):
            base = ours(IDS).logits
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - base).abs().max().item() > 1e-3  # the adapter changes the output


def test_peft_adapter_loads_into_ours_with_the_same_logits(folder: Path, tmp_path: Path) -> None:
    hf = _hf(folder)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                          init_lora_weights=False, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
    theirs = peft.get_peft_model(hf, cfg).eval()
    theirs.save_pretrained(str(tmp_path / "p"))
    ours, _ = load_backbone(folder)
    assert load_adapter(ours, tmp_path / "p", name="p") == "p"
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(ours)} == {"q_proj", "v_proj", "down_proj"}
    assert ours.get_submodule("blocks.0.mlp.down_proj").specs["p"].rank == 2
    with torch.no_grad():
        want = theirs(IDS).logits
        with use_adapter(ours, "p"):
            got = ours(IDS).logits
    assert (got - want).abs().max().item() <= 1e-4
    again = save_adapter(ours, "p", tmp_path / "again")  # and back out: peft reads our copy the same
    back = peft.PeftModel.from_pretrained(_hf(folder), str(again)).eval()
    with torch.no_grad():
        assert (back(IDS).logits - want).abs().max().item() <= 1e-5


def test_rslora_scale_is_read(folder: Path, tmp_path: Path) -> None:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], use_rslora=True, init_lora_weights=False)
    theirs = peft.get_peft_model(_hf(folder), cfg).eval()
    theirs.save_pretrained(str(tmp_path / "rs"))
    ours, _ = load_backbone(folder)
    load_adapter(ours, tmp_path / "rs")
    with torch.no_grad(), use_adapter(ours, "rs"):
        assert (ours(IDS).logits - theirs(IDS).logits).abs().max().item() <= 1e-4


def test_what_does_not_fit_is_refused(folder: Path, tmp_path: Path) -> None:
    ours, _ = load_backbone(folder)
    with pytest.raises(ConfigError, match="q_projj"):
        inject_adapter(ours, "x", targets=["q_projj"])
    dora = peft.get_peft_model(_hf(folder), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
        load_adapter(ours, tmp_path / "dora")
    wide = write_hf_backbone(tmp_path / "wide", tie=False, hidden_size=32, num_attention_heads=2)
    peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "w"))
    with pytest.raises(CheckpointError, match=r"do not fit a rank-2 adapter"):
        load_adapter(ours, tmp_path / "w")
    assert not lora_layers(ours)  # nothing was injected by the failed loads
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_adapter(ours, tmp_path)
