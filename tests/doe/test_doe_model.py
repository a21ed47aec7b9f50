"""DOETransformer contracts: routing fixed while decoding, exact mixed batches, add/remove/extract, save/load."""

from __future__ import annotations

import pytest
import torch

from taskmoe.doe.model import DOEConfig, build_doe, load_doe, save_doe
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.models import LMConfig

V = 97


def model(moe_every: int = 1, max_experts: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = DOEConfig(lm=LMConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4), experts=["a", "b", "c"],
                    moe_every=moe_every, max_experts=max_experts, **kw)
    m = build_doe(cfg).eval()
    with torch.no_grad():  # spread the gates so batches really mix experts
        for n in m.gate.names:
            m.gate.weight[n].mul_(4.0)
    return m


def test_routing_fixed_during_generation_and_cached_decode_equals_full_forward() -> None:
    m = model(moe_every=2)
    ids = torch.randint(0, V, (5, 14))
    prompt = torch.zeros(5, 14, dtype=torch.bool)
    prompt[:, :8] = True
    with torch.no_grad():
        full = m(ids, prompt_mask=prompt)
        out = m(ids[:, :8], m.init_state(5))
        r0 = out.routing
        state = out.state
        for t in range(8, 14):
            out = m(ids[:, t : t + 1], state)
            state = out.state
            assert out.routing is r0  # every step reuses the prefill decision
        assert torch.equal(full.routing.ids, r0.ids)
        torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
        # and the routing does not depend on what follows the prompt
        other = ids.clone()
        other[:, 8:] = torch.randint(0, V, (5, 6))
        assert torch.equal(m(other, prompt_mask=prompt).routing.ids, r0.ids)


def test_mixed_batch_equals_each_sequence_alone() -> None:
    m = model()
    ids = torch.randint(0, V, (6, 10))
    with torch.no_grad():
        out = m(ids)
        assert len({tuple(r) for r in out.routing.ids.tolist()}) > 1  # really a mixed batch
        for b in range(6):
            alone = m(ids[b : b + 1])
            assert torch.equal(alone.routing.ids, out.routing.ids[b : b + 1])
            torch.testing.assert_close(alone.logits, out.logits[b : b + 1], rtol=1e-5, atol=1e-5)


def test_generate_matches_rows_alone() -> None:
    m = model()
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10], [11]]
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0)
    together = generate(m, prompts, cfg)
    for p, got in zip(prompts, together):
        assert generate(m, [p], cfg)[0] == got


def test_add_expert_untrained_changes_nothing_and_training_it_keeps_rejected_rows_bit_identical() -> None:
    m = model(max_experts=2)
    pos = torch.randint(0, 20, (8, 12))  # the new expert's data: tokens 0..19
    neg = torch.randint(50, V, (8, 12))  # everything else
    with torch.no_grad():
        before_pos, before_neg = m(pos).logits, m(neg).logits
    frozen = {k: v.clone() for k, v in m.state_dict().items()}
    m.add_expert("new", init_from="a")
    assert m.expert_names == ("a", "b", "c", "new") and m.doe_config.late_experts == ["new"]
    with torch.no_grad():  # an untrained gate rejects everything: all outputs bit-identical
        assert torch.equal(m(pos).logits, before_pos) and torch.equal(m(neg).logits, before_neg)
    trainable = m.freeze_except("new")
    opt = torch.optim.AdamW(trainable, lr=3e-2, weight_decay=0.1)
    labels = torch.cat([torch.ones(8), torch.zeros(8)])
    x = torch.cat([pos, neg])
    j = m.expert_names.index("new")
    force = torch.full((16, 4), -1, dtype=torch.long)
    force[:, j] = labels.long()  # teacher-force the new expert on its own data
    m.train()
    for _ in range(40):
        out = m(x, force=force)
        lm = torch.nn.functional.cross_entropy(out.logits[:8, :-1].reshape(-1, V), x[:8, 1:].reshape(-1))
        bce = torch.nn.functional.binary_cross_entropy(out.routing.scores[:, j], labels)
        opt.zero_grad()
        (lm + bce).backward()
        opt.step()
    m.eval()
    for k, v in m.state_dict().items():  # nothing outside the new expert moved
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    with torch.no_grad():
        r_pos, r_neg = m.route(pos), m.route(neg)
        accepted_pos = r_pos.accepted[:, j]
        rejected_neg = ~r_neg.accepted[:, j]
        assert bool(accepted_pos.any()) and bool(rejected_neg.any())  # the gate learned something
        out_pos, out_neg = m(pos).logits, m(neg).logits
        assert torch.equal(out_neg[rejected_neg], before_neg[rejected_neg])
        assert torch.equal(out_pos[~accepted_pos], before_pos[~accepted_pos])
        assert not torch.equal(out_pos[accepted_pos], before_pos[accepted_pos])


def test_remove_expert_keeps_rows_it_did_not_serve() -> None:
    m = model(max_experts=2)
    ids = torch.randint(0, V, (12, 9))
    with torch.no_grad():
        out = m(ids)
        served_by_c = (out.routing.ids == m.expert_names.index("c")).any(1)
        assert bool(served_by_c.any()) and bool((~served_by_c).any())
        m.remove_expert("c")
        assert m.expert_names == ("a", "b") and all(m.moe(i).names == ("a", "b") for i in m.moe_layers)
        after = m(ids)
        keep = ~served_by_c & ~out.routing.fallback  # a default could have been c before
        assert torch.equal(after.logits[keep], out.logits[keep])
    with pytest.raises(ConfigError):
        m.remove_expert("c")


def test_extract_preserves_outputs_on_the_sequences_it_serves() -> None:
    m = model(max_experts=2)
    ids = torch.randint(0, V, (16, 9))
    small = m.extract(["a", "b"])
    assert small.expert_names == ("a", "b")
    assert small.num_params() < m.num_params()
    with torch.no_grad():
        out = m(ids)
        c = m.expert_names.index("c")
        served = ~(out.routing.ids == c).any(1)
        assert bool(served.any())
        sub = ids[served]
        assert torch.equal(small(sub).logits, m(sub).logits)  # same batch: bit-identical
        torch.testing.assert_close(small(sub).logits, out.logits[served], rtol=1e-5, atol=1e-6)
    assert m.expert_names == ("a", "b", "c")  # the original is untouched


def test_save_load_round_trip(tmp_path) -> None:
    m = model()
    m.add_expert("late")
    ids = torch.randint(0, V, (4, 7))
    save_doe(m, tmp_path / "doe")
    back = load_doe(tmp_path / "doe").eval()
    assert back.expert_names == m.expert_names and back.gate.late == ["late"]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)
    (tmp_path / "doe" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_doe(tmp_path / "doe")


def test_gate_supervision_router_needs_labels() -> None:
    m = model(gate_supervision="router")
    m.train()
    out = m(torch.randint(0, V, (6, 8)))
    loss = m.gate_loss(out.routing, torch.tensor([0, 1, 2, -1, 0, 1]))
    loss.backward()
    assert m.gate.weight["a"].grad is not None and loss.item() > 0
    with pytest.raises(ConfigError, match="labels"):
        m.gate_loss(out.routing)


def test_training_routing_balances_experts() -> None:
    m = model(max_experts=1)
    m.train()
    out = m(torch.randint(0, V, (12, 8)))
    assert out.routing.accepted.sum(0).tolist() == [4, 4, 4]  # capacity C = 12 / 3, one expert per row
    assert (out.routing.ids[:, 0] >= 0).all() and torch.bincount(out.routing.top1(), minlength=3).tolist() == [4, 4, 4]
