"""DOE upcycling of a (tiny, random, built in code) Llama backbone: exactness, flexible experts, decode, folders."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from taskmoe.doe import build_doe, DOEConfig
from taskmoe.doe.upcycle import (BASE, LoRAMLP, add_backbone_expert, centroid_gates, expert_from_adapter,
                                 gate_features, load_upcycled, save_upcycled, train_gates, upcycle_config,
                                 upcycle_model)
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.layers.lora import inject, save_adapter, set_adapter
from taskmoe.models import TransformerLMConfig
from taskmoe.models.backbones import LlamaConfig, llama_lm
from taskmoe.training.recipes.doe_add import add_expert_loss

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def _upcycled(tmp_path, gate_layer: int = 1, max_experts: int = 2, **kw):
    torch.manual_seed(0)
    backbone = llama_lm(CFG).eval()
    ref = copy.deepcopy(backbone)
    model = upcycle_model(backbone, upcycle_config(tmp_path / "bb", CFG, gate_layer=gate_layer,
                                                   max_experts=max_experts, lora_rank=4, lora_alpha=8.0, **kw))
    return model.eval(), ref


def _perturb(model, name: str, bias: float = 5.0) -> None:
    with torch.no_grad():
        for p in model.expert_parameters(name):
            p.add_(0.3 * torch.randn_like(p))
        model.gate.bias[name].fill_(bias)


def test_upcycled_equals_backbone_and_removing_added_experts_restores_it(tmp_path) -> None:
    model, ref = _upcycled(tmp_path)
    ids = torch.randint(0, 64, (3, 10))
    assert torch.equal(model(ids).logits, ref(ids).logits)  # nothing added: exactly the backbone
    add_backbone_expert(model, "legal", "lora")
    add_backbone_expert(model, "chat", "copy")
    assert torch.equal(model(ids).logits, ref(ids).logits)  # new gates reject everything
    _perturb(model, "legal")
    _perturb(model, "chat")
    assert not torch.allclose(model(ids).logits, ref(ids).logits)
    model.remove_expert("legal")
    model.remove_expert("chat")
    assert model.expert_names == (BASE,) and model.doe_config.backbone.kinds == {}
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.moe_layers == [1, 2] and not any(p.requires_grad for p in model.moe(1).experts[BASE].parameters())


def test_adding_an_expert_leaves_others_bit_identical(tmp_path) -> None:
    model, _ = _upcycled(tmp_path)
    add_backbone_expert(model, "legal", "lora")
    _perturb(model, "legal", bias=-10.0)
    with torch.no_grad():  # legal accepts rows whose pooled features point along w
        model.gate.weight["legal"].zero_()
    ids = torch.randint(0, 64, (4, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out0 = model(ids).logits
    trainable = add_backbone_expert(model, "chat", "copy")
    assert {id(p) for p in trainable} == {id(p) for p in model.expert_parameters("chat")}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(ids).logits, out0)  # the new gate rejects every row
    _perturb(model, "chat", bias=-10.0)  # trained but still rejecting: outputs unchanged
    assert torch.equal(model(ids).logits, out0)


def test_lora_expert_alone_equals_backbone_with_the_same_adapter(tmp_path) -> None:
    model, ref = _upcycled(tmp_path)
    add_backbone_expert(model, "legal", "lora")
    inject(ref, [r"blocks\.[12]\.mlp\.(gate|up|down)_proj"], rank=4, alpha=8.0, adapter_name="legal")
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    set_adapter(ref, "legal")
    save_adapter(ref, tmp_path / "adapter", "legal")
    expert_from_adapter(model, "legal", tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 8))
    force = torch.tensor([[0, 1], [0, 1]])
    assert torch.equal(model(ids, force=force).logits, ref(ids).logits)
    bad = llama_lm(CFG)
    inject(bad, [r"blocks\.0\.mlp\.gate_proj"], rank=4, alpha=8.0, adapter_name="x")
    save_adapter(bad, tmp_path / "bad", "x")
    with pytest.raises(CheckpointError, match="not an MLP projection of a MoE block"):
        expert_from_adapter(model, "legal", tmp_path / "bad")


def _decode(model, ids: torch.Tensor, steps: int = 4) -> torch.Tensor:
    state = model.init_state(ids.shape[0])
    out = model(ids, state)
    logits, state = [out.logits[:, -1]], out.state
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        out = model(nxt, state)
        logits.append(out.logits[:, -1])
        state = out.state
    return torch.stack(logits, 1)  # (B, steps + 1, V)


def test_grouped_decode_equals_mixed_and_each_row_alone(tmp_path) -> None:
    model, _ = _upcycled(tmp_path)
    add_backbone_expert(model, "legal", "lora")
    add_backbone_expert(model, "chat", "lora")
    _perturb(model, "legal", bias=0.0)
    _perturb(model, "chat", bias=0.0)
    ids = torch.randint(0, 64, (8, 7))
    feats = gate_features(model, ids.tolist())
    with torch.no_grad():  # legal accepts rows with positive projection on a direction, chat on another
        model.gate.weight["legal"].copy_(feats[0] * 4)
        model.gate.weight["chat"].copy_(feats[1] * 4)
        model.gate.bias["legal"].fill_(-4 * float(feats[0] @ feats[2:].mean(0)))
        model.gate.bias["chat"].fill_(-4 * float(feats[1] @ feats[2:].mean(0)))
    routing = model.route(ids)
    assert len(set(routing.expert_names())) >= 2  # a genuinely mixed batch
    mixed = _decode(model, ids)
    for b in range(ids.shape[0]):
        assert torch.allclose(mixed[b], _decode(model, ids[b : b + 1])[0], atol=1e-5, rtol=0)
    groups = routing.groups()
    for rows in groups.values():
        grouped = _decode(model, ids[rows])
        assert model.route(ids[rows]).plan.group is not None  # the expert-grouped fast path
        assert torch.allclose(grouped, mixed[rows], atol=1e-5, rtol=0)


def test_centroid_gates_then_training_route_each_domain(tmp_path) -> None:
    model, _ = _upcycled(tmp_path)
    add_backbone_expert(model, "legal", "lora")
    add_backbone_expert(model, "chat", "lora")
    legal = torch.randint(0, 32, (12, 9)).tolist()  # two "domains": disjoint vocabularies
    chat = torch.randint(32, 64, (12, 9)).tolist()
    f_l, f_c = gate_features(model, legal), gate_features(model, chat)
    margins = centroid_gates(model, {"legal": f_l, "chat": f_c})
    assert all(m > 0 for m in margins.values())
    r = model.route(torch.tensor(legal + chat))
    names = r.expert_names()
    assert sum(n[0] == "legal" for n in names[:12]) >= 10 and sum(n[0] == "chat" for n in names[12:]) >= 10
    feats = torch.cat([f_l, f_c])
    targets = torch.tensor([[1, 0]] * 12 + [[0, 1]] * 12)
    losses = train_gates(model, feats, targets, ["legal", "chat"], steps=50)
    assert losses[-1] < losses[0]
    assert [n[0] for n in model.route(torch.tensor(legal + chat)).expert_names()] == ["legal"] * 12 + ["chat"] * 12


def test_save_load_references_the_backbone_and_refuses_a_changed_one(tmp_path) -> None:
    from tests.models.backbones.backbone_helpers import write_hf_backbone
    from taskmoe.models.backbones import load_backbone, read_backbone_config

    bb = tmp_path / "bb"
    write_hf_backbone(bb, num_hidden_layers=3)
    backbone, _ = load_backbone(bb)
    model = upcycle_model(backbone, upcycle_config(bb, read_backbone_config(bb), gate_layer=1, lora_rank=4))
    add_backbone_expert(model, "legal", "lora")
    add_backbone_expert(model, "chat", "copy")
    _perturb(model, "legal", bias=0.5)
    folder = save_upcycled(model, tmp_path / "doe")
    stored = json.loads((folder / "config.json").read_text())
    assert stored["kind"] == "doe"
    from taskmoe.io import load_tensors

    names = load_tensors(folder / "model.safetensors").keys()
    assert not any(".experts.base." in k or k.startswith("embedding") for k in names)  # base weights stored once
    again = load_upcycled(folder)
    ids = torch.randint(0, 100, (3, 6))
    assert torch.equal(again(ids).logits, model.eval()(ids).logits)
    from taskmoe.doe import load_doe

    assert torch.equal(load_doe(folder)(ids).logits, model(ids).logits)
    from taskmoe.doe.upcycle import doe_upcycle

    res = doe_upcycle(backbone=bb, out=tmp_path / "cli", experts="legal,chat", kind="lora", gate_layer=1, lora_rank=4)
    assert res["experts"] == ["base", "legal", "chat"] and res["moe_layers"] == 2
    fresh, _ = load_backbone(bb)
    assert torch.equal(load_upcycled(tmp_path / "cli")(ids).logits, fresh(ids).logits)  # new gates reject all
    cfg = json.loads((bb / "config.json").read_text())
    (bb / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(CheckpointError, match="another architecture"):
        load_upcycled(folder)
    (bb / "config.json").write_text(json.dumps(cfg))
    with open(bb / "model.safetensors", "r+b") as fh:  # change the weights
        fh.seek(-8, 2)
        fh.write(b"\x01" * 8)
    with pytest.raises(CheckpointError, match="weights changed"):
        load_upcycled(folder)
    import shutil

    shutil.rmtree(bb)
    with pytest.raises(CheckpointError, match="not found"):
        load_upcycled(folder)


def test_new_expert_learns_under_max_experts_1_even_when_incumbents_accept() -> None:
    cfg = DOEConfig(lm=TransformerLMConfig(vocab_size=48, d_model=16, n_layers=2, n_heads=2), experts=["a", "b"],
                    max_experts=1)
    model = build_doe(cfg).train()
    with torch.no_grad():
        for n in ("a", "b"):
            model.gate.bias[n].fill_(20.0)  # incumbents accept every sequence, with p ~ 1
    model.add_expert("new")
    model.freeze_except("new")
    j = model.expert_names.index("new")
    batch = {"input_ids": torch.randint(0, 48, (4, 12)), "targets": torch.randint(0, 48, (4, 12)),
             "prompt_mask": torch.arange(12).expand(4, 12) < 4, "label": torch.tensor([1, 1, 0, 0])}
    loss_fn = add_expert_loss(j, len(model.expert_names))
    loss, _ = loss_fn(model, batch)
    loss.backward()
    grads = [p.grad for i in model.moe_layers for p in model.moe(i).experts["new"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    opt = torch.optim.SGD(model.expert_parameters("new"), lr=0.5)
    first = float(loss.detach())
    for _ in range(10):
        opt.zero_grad()
        loss, _ = loss_fn(model, batch)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first


def test_upcycle_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="gate_layer"):
        upcycle_config(tmp_path / "none", CFG, gate_layer=3)
    model, _ = _upcycled(tmp_path)
    with pytest.raises(ConfigError, match="'copy' or 'lora'"):
        add_backbone_expert(model, "x", "dense")
    with pytest.raises(ConfigError, match="pretrained backbone"):
        build_doe(model.doe_config)
    assert isinstance(add_backbone_expert(model, "y", "lora") and model.moe(1).experts["y"], LoRAMLP)
