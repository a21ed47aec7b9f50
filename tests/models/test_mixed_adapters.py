"""Many adapters in one batch on the backbone: one forward (base once, each adapter on its segment of
rows) equals each row run alone with its adapter, for prefill and decode, ragged prompts, through generate."""

from __future__ import annotations

import pytest
import torch

from taskmoe.errors import ConfigError
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.layers.lora import lora_layers, use_adapter
from taskmoe.models.adapters import inject_adapter, set_active
from taskmoe.models.backbones import LlamaConfig, llama_lm
from taskmoe.models.mixed_adapters import MixedAdapterLM

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)
NAMES = ["legal", "code", "chat"]
PROMPTS = [[5, 9, 33], [7, 10, 8, 9, 41, 2, 60], [50], [12, 13, 14, 15, 16], [3, 3, 3], [90, 1, 2, 3, 4, 5, 6]]
SIDE = ["code", "legal", None, "chat", "legal", "code"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = llama_lm(CFG, init_std=0.2).eval()
    for i, name in enumerate(NAMES):
        targets = ("q_proj", "v_proj", "down_proj") if name == "chat" else ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj")
        inject_adapter(m, name, r=2 + 2 * i, alpha=8.0, targets=targets)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            for p in layer.lora_B.values():
                p.normal_(0, 0.3)
    return m


def _alone(model, name, fn):
    with use_adapter(model, name):
        return fn()


def test_stateless_mixed_pass_equals_rows_alone(model) -> None:
    ids = torch.randint(0, 97, (6, 9))
    lm = MixedAdapterLM(model)
    with torch.no_grad():
        mixed = lm(ids, adapters=SIDE).logits
        for i, name in enumerate(SIDE):
            alone = _alone(model, name, lambda: model(ids[i : i + 1]).logits)
            assert (mixed[i : i + 1] - alone).abs().max().item() <= 1e-5
        base = _alone(model, None, lambda: model(ids).logits)
    assert (mixed[2] - base[2]).abs().max().item() <= 1e-6  # the no-adapter row is the base model
    assert (mixed[0] - base[0]).abs().max().item() > 1e-3  # the adapters do change their rows


def test_ragged_prefill_and_decode_equal_rows_alone(model) -> None:
    lm = MixedAdapterLM(model)
    short, long_ = [0, 2, 4], [1, 3, 5]  # two prefill groups of different lengths, then one decode batch
    with torch.no_grad():
        states, logits = [], []
        for group, T in ((short, 1), (long_, 5)):
            ids = torch.tensor([PROMPTS[i][:T] for i in group])
            out = lm(ids, lm.init_state(len(group), side=[SIDE[i] for i in group]))
            states.append(out.state)
            logits.append(out.logits[:, -1])
        state = type(states[0]).cat(states)
        order = short + long_
        steps = torch.randint(0, 97, (6, 3))
        mixed = [torch.cat(logits)]
        for t in range(3):
            out = lm(steps[:, t : t + 1], state)
            state = out.state
            mixed.append(out.logits[:, -1])
        state = state.select(torch.tensor([4, 0]))  # finished rows leave; the adapters stay with their rows
        tail = lm(torch.tensor([[7], [8]]), state).logits[:, -1]
        for j, i in enumerate(order):
            T = 1 if i in short else 5
            seq = torch.tensor([PROMPTS[i][:T] + steps[j].tolist()])
            alone = _alone(model, SIDE[i], lambda: model(seq).logits[0, T - 1 :])  # (4, V)
            got = torch.stack([m[j] for m in mixed])
            assert (got - alone).abs().max().item() <= 1e-5, (i, SIDE[i])
        for j, (row, tok) in enumerate(((4, 7), (0, 8))):
            i = order[row]
            T = 1 if i in short else 5
            seq = torch.tensor([PROMPTS[i][:T] + steps[row].tolist() + [tok]])
            alone = _alone(model, SIDE[i], lambda: model(seq).logits[0, -1])
            assert (tail[j] - alone).abs().max().item() <= 1e-5


def test_generate_with_side_equals_each_row_alone(model) -> None:
    lm = MixedAdapterLM(model)
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0)
    mixed = generate(lm, PROMPTS, cfg, side=SIDE)
    alone = [_alone(model, name, lambda: generate(model, [p], cfg)[0]) for p, name in zip(PROMPTS, SIDE)]
    assert mixed == alone
    assert len({tuple(r) for r in mixed}) > 1


def test_set_active_per_row_and_errors(model) -> None:
    ids = torch.randint(0, 97, (3, 4))
    with torch.no_grad():
        set_active(model, ["chat", None, "legal"])
        mixed = model(ids).logits
        set_active(model, "legal")
        legal = model(ids).logits
        set_active(model, None)
        base = model(ids).logits
    assert (mixed[2] - legal[2]).abs().max().item() <= 1e-5 and (mixed[1] - base[1]).abs().max().item() <= 1e-6
    with pytest.raises(ConfigError, match="not in this model"):
        set_active(model, ["nope"])
    with pytest.raises(ConfigError, match="one adapter name"):
        MixedAdapterLM(model).init_state(2)
    with pytest.raises(ConfigError, match="unknown adapters"):
        MixedAdapterLM(model)(ids, adapters=["x", None, None])


def test_training_pass_uses_segments_and_reaches_every_adapter(model) -> None:
    ids = torch.randint(0, 97, (4, 5))
    side = ["legal", "code", None, "legal"]
    mixed = MixedAdapterLM(model)(ids, adapters=side).logits  # grad enabled: the segmented form
    with torch.no_grad():
        ref = MixedAdapterLM(model)(ids, adapters=side).logits  # no grad: the batched form (scale folded into B)
    assert (mixed.detach() - ref).abs().max().item() <= 5e-5  # float32 round-off of two orderings, 2 layers deep
    mixed.square().mean().backward()
    layer = model.get_submodule("blocks.0.mixer.q_proj")
    assert layer.lora_B["legal"].grad.abs().sum() > 0 and layer.lora_B["code"].grad.abs().sum() > 0
    assert layer.lora_B["chat"].grad is None or layer.lora_B["chat"].grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)
