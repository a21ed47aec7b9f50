"""LoRA contracts: inject reports what it wrapped and fails loudly on misses, a fresh adapter is a
no-op, merge equals the unmerged forward and is idempotent, unmerge is bit-exact, the switch and
row mask give exactly the base output, and adapters round-trip through their own files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.layers.lora import (
    LoRALinear,
    adapter_names,
    adapter_state_dict,
    base_state_dict,
    inject,
    load_adapter,
    mark_only_adapter_trainable,
    merge_adapter,
    remove_adapters,
    save_adapter,
    set_adapter,
    unmerge_adapter,
    use_adapter,
)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 2 * d)
        self.out_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_proj(torch.tanh(self.in_proj(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, d: int = 8, vocab: int = 11, n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def randomize(model: nn.Module, name: str) -> None:
    """Give adapter ``name`` a non-zero B so it changes the output."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith(f"lora_B.{name}"):
                p.normal_(0, 0.5)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 11, (3, 5))


def test_inject_returns_wrapped_names_in_module_order() -> None:
    m = Toy()
    names = inject(m, ["in_proj", r"blocks\.1\.out_proj"], rank=2, alpha=4, adapter_name="code")
    assert names == ["blocks.0.in_proj", "blocks.1.in_proj", "blocks.1.out_proj"]
    assert all(isinstance(m.get_submodule(n), LoRALinear) for n in names)
    assert isinstance(m.blocks[0].out_proj, nn.Linear) and not isinstance(m.blocks[0].out_proj, LoRALinear)
    assert adapter_names(m) == ["code"]


def test_inject_names_every_pattern_that_matched_nothing() -> None:
    m = Toy()
    with pytest.raises(ConfigError) as e:
        inject(m, ["in_proj", "q_proj", "norm"], adapter_name="a")
    msg = str(e.value)
    assert "'q_proj'" in msg and "'norm'" in msg and "LayerNorm" not in msg
    assert "blocks.0.norm" in msg  # says what the non-linear pattern did match
    assert "'in_proj'" not in msg
    assert not any(isinstance(x, LoRALinear) for x in m.modules())  # nothing changed


def test_fresh_adapter_is_exact_noop(ids: torch.Tensor) -> None:
    m = Toy()
    ref = m(ids)
    inject(m, ["in_proj", "out_proj", "head"], rank=4, alpha=8)
    assert torch.equal(m(ids), ref)


def test_state_dict_keys_match_plain_model() -> None:
    m = Toy()
    plain = {k: v.clone() for k, v in m.state_dict().items()}
    inject(m, ["in_proj"], rank=2, alpha=2)
    sd = base_state_dict(m)
    assert sd.keys() == plain.keys()
    assert all(torch.equal(sd[k], plain[k]) for k in plain)
    assert set(m.state_dict()) - set(plain) == {
        "blocks.0.in_proj.lora_A.default", "blocks.0.in_proj.lora_B.default",
        "blocks.1.in_proj.lora_A.default", "blocks.1.in_proj.lora_B.default",
    }


def test_lora_forward_matches_hand_formula() -> None:
    """y = x W^T + b + (alpha/r) x A^T B^T."""
    lin = nn.Linear(3, 2)
    layer = LoRALinear(lin)
    layer.add_adapter("a", rank=1, alpha=3.0)
    with torch.no_grad():
        layer.lora_A["a"].copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        layer.lora_B["a"].copy_(torch.tensor([[2.0], [0.5]]))
    x = torch.tensor([[1.0, 2.0, 4.0]])
    # x A^T = 1 - 4 = -3; times B^T = [-6, -1.5]; times alpha/r = 3 -> [-18, -4.5]
    expect = lin(x) + torch.tensor([[-18.0, -4.5]])
    torch.testing.assert_close(layer(x), expect)


def test_merge_equals_unmerged_and_is_idempotent_and_unmerge_bit_exact(ids: torch.Tensor) -> None:
    m = Toy()
    base_out = m(ids)
    w0 = m.blocks[0].in_proj.weight.detach().clone()
    inject(m, ["in_proj", "out_proj"], rank=3, alpha=6)
    randomize(m, "default")
    adapted = m(ids)
    assert not torch.allclose(adapted, base_out)
    merge_adapter(m, "default")
    once_w = m.blocks[0].in_proj.weight.detach().clone()
    torch.testing.assert_close(m(ids), adapted, rtol=1e-5, atol=1e-5)
    merge_adapter(m, "default")  # second merge must not apply the delta again
    assert torch.equal(m.blocks[0].in_proj.weight, once_w)
    # while merged, the state dict still reports the original weight
    assert torch.equal(m.state_dict()["blocks.0.in_proj.weight"], w0)
    unmerge_adapter(m)
    unmerge_adapter(m)  # idempotent too
    assert torch.equal(m.blocks[0].in_proj.weight, w0)  # bit-exact restore
    set_adapter(m, None)
    assert torch.equal(m(ids), base_out)


def test_disabled_adapter_equals_base_and_context_restores(ids: torch.Tensor) -> None:
    m = Toy()
    base_out = m(ids)
    inject(m, ["in_proj"], rank=2, alpha=4, adapter_name="code")
    randomize(m, "code")
    adapted = m(ids)
    with use_adapter(m, None):
        assert torch.equal(m(ids), base_out)
    assert torch.equal(m(ids), adapted)
    merge_adapter(m, "code")
    with use_adapter(m, None):  # switching off a merged adapter unmerges it
        assert torch.equal(m(ids), base_out)
    assert torch.equal(m(ids), adapted)


def test_row_mask_gives_exact_mixed_batch(ids: torch.Tensor) -> None:
    m = Toy()
    inject(m, ["in_proj", "head"], rank=2, alpha=4, adapter_name="code")
    randomize(m, "code")
    rows = torch.tensor([True, False, True])
    with use_adapter(m, "code", rows=rows):
        mixed = m(ids)
    with use_adapter(m, "code"):
        on = m(ids)
    with use_adapter(m, None):
        off = m(ids)
    assert torch.equal(mixed[rows], on[rows])
    assert torch.equal(mixed[~rows], off[~rows])


def test_two_adapters_switch(ids: torch.Tensor) -> None:
    m = Toy()
    inject(m, ["in_proj"], rank=2, alpha=4, adapter_name="a")
    inject(m, ["in_proj", "out_proj"], rank=2, alpha=4, adapter_name="b")
    randomize(m, "a")
    randomize(m, "b")
    with use_adapter(m, "a"):
        out_a = m(ids)
    with use_adapter(m, "b"):
        out_b = m(ids)
    set_adapter(m, "b")
    merge_adapter(m, "a")  # merging 'a' leaves 'b'-only layers switched off
    torch.testing.assert_close(m(ids), out_a, rtol=1e-5, atol=1e-5)
    with use_adapter(m, "b"):
        assert torch.equal(m(ids), out_b)  # 'a' was unmerged exactly before 'b' ran
    with pytest.raises(ConfigError, match="already exists"):
        inject(m, ["in_proj"], adapter_name="a")


def test_tied_weight_is_never_merged() -> None:
    m = Toy()
    m.head.weight = m.embed.weight
    inject(m, ["head"], rank=2, alpha=2)
    with pytest.raises(ConfigError, match="tied"):
        merge_adapter(m, "default")


def test_only_adapter_trains() -> None:
    m = Toy()
    inject(m, ["in_proj"], rank=2, alpha=2, adapter_name="code")
    params = mark_only_adapter_trainable(m, "code")
    assert len(params) == 4
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.in_proj.lora_{x}.code" for i in (0, 1) for x in "AB"
    }
    m(torch.randint(0, 11, (2, 4))).sum().backward()
    assert m.blocks[0].in_proj.weight.grad is None
    assert m.blocks[0].in_proj.lora_B["code"].grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path, ids: torch.Tensor) -> None:
    m = Toy()
    inject(m, ["in_proj", "head"], rank=2, alpha=5, adapter_name="code", dropout=0.1)
    randomize(m, "code")
    m.eval()
    want = m(ids)
    folder = save_adapter(m, tmp_path / "adapters" / "code", "code")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["kind"] == "lora_adapter" and set(cfg["config"]["modules"]) == {
        "blocks.0.in_proj", "blocks.1.in_proj", "head"}
    fresh = Toy()
    fresh.load_state_dict(base_state_dict(m))
    fresh.eval()
    assert load_adapter(fresh, folder) == "code"
    assert torch.equal(fresh(ids), want)
    sd_a, sd_b = adapter_state_dict(m, "code"), adapter_state_dict(fresh, "code")
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert fresh.blocks[0].in_proj.specs["code"].dropout == pytest.approx(0.1)


def test_load_rejects_missing_target_and_wrong_shape(tmp_path) -> None:
    m = Toy(d=8)
    inject(m, ["in_proj"], rank=2, alpha=2, adapter_name="code")
    folder = save_adapter(m, tmp_path / "code", "code")
    with pytest.raises(CheckpointError, match="blocks.1.in_proj' not in model"):
        load_adapter(Toy(d=8, n=1), folder)
    with pytest.raises(CheckpointError, match=r"adapter is for \(8 -> 16\), model has \(6 -> 12\)"):
        load_adapter(Toy(d=6), folder)


def test_remove_adapters_restores_plain_linear(ids: torch.Tensor) -> None:
    m = Toy()
    base_out = m(ids)
    inject(m, ["in_proj"], rank=2, alpha=2)
    randomize(m, "default")
    merge_adapter(m, "default")
    assert remove_adapters(m) == ["blocks.0.in_proj", "blocks.1.in_proj"]
    assert type(m.blocks[0].in_proj) is nn.Linear
    assert torch.equal(m(ids), base_out)


def test_on_summarizer_lm_decode_matches_full_pass_and_round_trips(tmp_path) -> None:
    """On the real SSM summarizer: adapter-on step-by-step decoding equals the full pass, mixed
    rows are exact, and save_lm (before injection) + load_adapter reproduces the adapted model."""
    from taskmoe.models.builders import summarizer_lm
    from taskmoe.models.checkpoint import load_lm, save_lm
    from taskmoe.models.config import LMConfig

    model = summarizer_lm(LMConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2)).eval()
    folder = save_lm(model, tmp_path / "summarizer", kind="summarizer")
    names = inject(model, ["in_proj", "out_proj"], rank=2, alpha=4, adapter_name="code")
    assert names == [f"blocks.{i}.mixer.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")]
    randomize(model, "code")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        full = model(ids).logits
        state, steps = model.init_state(2), []
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], state)
            state = out.state
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
        with use_adapter(model, None):
            base = model(ids).logits
        with use_adapter(model, "code", rows=torch.tensor([False, True])):
            mixed = model(ids).logits
        assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[1], full[1])
    save_adapter(model, tmp_path / "summarizer_code", "code")
    again = load_lm(folder).eval()
    load_adapter(again, tmp_path / "summarizer_code")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, full)
