"""Cohesion recipe pieces: raw-text windows, MLP-only LoRA targets, exact task arithmetic of two adapters."""

from __future__ import annotations

import torch

from taskmoe.data.text_windows import TextWindows
from taskmoe.layers.lora import inject, load_adapter, save_adapter, set_adapter
from taskmoe.models.backbones import LlamaConfig, llama_lm
from taskmoe.training.recipes.cohesion import CohesionConfig, mlp_targets, stage_done, task_arithmetic

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


class CharTok:
    pad_id = 0

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return [ord(c) % 60 + 1 for c in text]


def test_text_windows_cut_documents_without_crossing_them() -> None:
    """'abcdefghij' (10 tokens), max_len 4: windows of 5 tokens start at 0, 4, 8 -> [a..e], [e..i], [i, j] (tail kept
    when >= min_tokens=2); full_only keeps only the two 5-token windows; the second document is cut on its own."""
    tok = CharTok()
    ds = TextWindows(["abcdefghij", "xyz"], tok, 4, min_tokens=2)
    ids = [tok.encode(t) for t in ("abcdefghij", "xyz")]
    assert [x.tolist() for x, _ in ds.items] == [ids[0][0:4], ids[0][4:8], ids[0][8:9], ids[1][0:2]]
    assert [y.tolist() for _, y in ds.items] == [ids[0][1:5], ids[0][5:9], ids[0][9:10], ids[1][1:3]]
    full = TextWindows(["abcdefghij", "xyz"], tok, 4, full_only=True)
    assert full.lengths() == [4, 4]
    batch = ds.collate([ds[0], ds[2]])
    assert batch["input_ids"].shape == (2, 4) and batch["labels"][1].tolist() == [ids[0][9], -100, -100, -100]


def test_task_arithmetic_is_exactly_the_weighted_sum_of_updates(tmp_path) -> None:
    torch.manual_seed(0)
    model = llama_lm(CFG).eval()
    targets = mlp_targets(1, 3)
    for name in ("legal", "chat"):
        inject(model, targets, rank=4, alpha=8.0, adapter_name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    save_adapter(model, tmp_path / "legal", "legal")
    save_adapter(model, tmp_path / "chat", "chat")
    assert stage_done(tmp_path / "legal") and not stage_done(tmp_path / "nothing")
    task_arithmetic([tmp_path / "legal", tmp_path / "chat"], [0.5, 0.5], tmp_path / "merged")
    load_adapter(model, tmp_path / "merged", name="merged")
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "specs")}
    assert wrapped == {f"blocks.{i}.mlp.{p}" for i in (1, 2) for p in ("gate_proj", "up_proj", "down_proj")}
    for n in wrapped:
        layer = model.get_submodule(n)
        want = 0.5 * (layer.delta_weight("legal") + layer.delta_weight("chat"))
        assert torch.allclose(layer.delta_weight("merged"), want, atol=1e-6, rtol=0)
    set_adapter(model, "merged")
    ids = torch.randint(0, 64, (2, 6))
    merged = model(ids).logits
    with torch.no_grad():  # the same model with W0 + 0.5 (dW_legal + dW_chat) folded into plain weights
        plain = llama_lm(CFG, init=False)
        sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
        for n in wrapped:
            layer = model.get_submodule(n)
            sd[f"{n}.weight"] = sd[f"{n}.weight"] + 0.5 * (layer.delta_weight("legal") + layer.delta_weight("chat"))
        plain.load_state_dict(sd)
    assert torch.allclose(merged, plain.eval()(ids).logits, atol=1e-5, rtol=0)


def test_cohesion_config_round_trips(tmp_path) -> None:
    cfg = CohesionConfig(gate_layer=2, merge_weights=[0.3])
    cfg.save(tmp_path / "c.json")
    assert CohesionConfig.load(tmp_path / "c.json") == cfg
