"""GAN step math (reward signs, baseline, REINFORCE gradient, discriminator CE), the uninterrupted
sample earning no generator gradient, the recomputed policy equal to the sampled one, a training
run through the shared loop (base weights frozen, resume-exact rollouts), and the discriminator
(learns a separable toy, exact under padding, save/load)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crosstalk_helpers import V, tiny_expert
from taskmoe.crosstalk.dialogue import DialogueConfig, DialogueTokens
from taskmoe.crosstalk.discriminator import (
    Discriminator,
    DiscriminatorConfig,
    expert_features,
    load_discriminator,
    pad_batch,
    save_discriminator,
)
from taskmoe.crosstalk.gan import (
    CrosstalkGAN,
    GANConfig,
    Rollout,
    attach_adapter,
    crosstalk_logprobs,
    detection_reward,
    discriminator_loss,
    gan_loss,
    reinforce_loss,
    update_baseline,
)
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.layers.lora import base_state_dict, lora_layers
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train

GCFG = GANConfig(dialogue=DialogueConfig(max_new_tokens=16, n_turns=3, segment_tokens=4, min_segment_tokens=2,
                                         temperature=1.0),
                 opening_min=2, opening_max=6, lora_rank=4, lora_targets=["out_proj", "down"])


def make_gan(seed: int = 0, cfg: GANConfig = GCFG, nonzero: bool = True) -> CrosstalkGAN:
    experts = [tiny_expert(1), tiny_expert(2)]
    torch.manual_seed(seed)
    for m in experts:
        attach_adapter(m, cfg)
        if nonzero:  # B != 0, so the adapters change the policy and gradients reach A too
            with torch.no_grad():
                for layer in lora_layers(m).values():
                    layer.lora_B[cfg.adapter].normal_(0.0, 0.2)
    disc = Discriminator(DiscriminatorConfig(vocab_size=V, d_model=16, dropout=0.0))
    return CrosstalkGAN(experts, ["law", "poet"], disc, cfg, DialogueTokens())


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"prompt": torch.randint(1, V, (n, 5), generator=g), "first": torch.arange(n) % 2,
            "confidences": torch.full((n, 2), 0.45)}


# ------------------------------------------------------------------------------- pure math
def test_detection_reward_signs() -> None:
    p = torch.tensor([0.9, 0.5, 0.1])
    assert detection_reward(p, "hard", 5.0).tolist() == [-5.0, -5.0, 5.0]  # detected -> heavy penalty
    assert detection_reward(p, "soft", 5.0).tolist() == pytest.approx([-4.0, 0.0, 4.0])  # S (1 - 2p)
    # soft = E[hard] when D's call is Bernoulli(p): -S p + S (1 - p)
    assert detection_reward(torch.tensor([0.3]), "soft", 2.0).item() == pytest.approx(-2 * 0.3 + 2 * 0.7)
    with pytest.raises(ConfigError, match="reward mode"):
        detection_reward(p, "log")


def test_baseline_update() -> None:
    # b' = 0.9 * 0.5 + 0.1 * mean(1, -1, 0.5) = 0.45 + 0.1 / 6
    b = update_baseline(torch.tensor(0.5), torch.tensor([1.0, -1.0, 0.5]), 0.9)
    assert b.item() == pytest.approx(0.45 + 0.1 / 6)
    assert update_baseline(torch.tensor(3.0), torch.tensor([1.0]), 0.0).item() == 1.0


def test_reinforce_loss_value_and_gradient() -> None:
    # L = -(1/B) sum_i A_i * logp_i / n_i; rows: (-3, n=3, A=1), (-4, n=2, A=-2), (-5, n=0, A=5)
    logp = torch.tensor([-3.0, -4.0, -5.0], requires_grad=True)
    n = torch.tensor([3.0, 2.0, 0.0])
    adv = torch.tensor([1.0, -2.0, 5.0], requires_grad=True)
    loss = reinforce_loss(logp, n, adv)
    assert loss.item() == pytest.approx(-(1 * -1.0 + -2 * -2.0 + 0.0) / 3)
    loss.backward()
    # dL/dlogp_i = -A_i / (n_i B): a positive advantage raises the sample's probability
    assert logp.grad.tolist() == pytest.approx([-1 / 9, 2 / 6, 0.0])
    assert adv.grad is None or torch.all(adv.grad == 0)  # the reward is a constant to the generators


def test_discriminator_loss_values() -> None:
    # z = 0 everywhere: BCE = ln 2 on both sides; D calls z >= 0 "interrupted"
    loss, acc_u, acc_i = discriminator_loss(torch.zeros(3), torch.zeros(3))
    assert loss.item() == pytest.approx(math.log(2))
    assert (acc_u.item(), acc_i.item()) == (0.0, 1.0)
    z_u, z_i = torch.tensor([-2.0, 1.0]), torch.tensor([3.0, -1.0])
    loss, acc_u, acc_i = discriminator_loss(z_u, z_i)
    bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))  # noqa: E731
    want = 0.5 * ((bce(-2, 0) + bce(1, 0)) / 2 + (bce(3, 1) + bce(-1, 1)) / 2)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert (acc_u.item(), acc_i.item()) == (0.5, 0.5)


# ----------------------------------------------------------------------------- the GAN step
def test_uninterrupted_sample_gets_no_generator_gradient() -> None:
    gan = make_gan()
    gan.eval()  # keeps the baseline fixed between the two calls
    ro = gan.rollout(batch(), torch.Generator().manual_seed(1))
    other = gan.rollout(batch(), torch.Generator().manual_seed(2))
    assert [t.ids for t in ro.real] != [t.ids for t in other.real]
    grads = []
    for real in (ro.real, other.real):
        gan.zero_grad()
        loss, _ = gan.losses(Rollout(real, ro.fake, ro.opening))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in gan.named_parameters() if p.grad is not None})
    g1, g2 = grads
    lora = [n for n in g1 if "lora_" in n]
    disc = [n for n in g1 if n.startswith("discriminator.")]
    assert lora and disc and set(g1) == set(lora) | set(disc)  # nothing else gets a gradient
    assert any(g1[n].abs().sum() > 0 for n in lora)
    assert all(torch.equal(g1[n], g2[n]) for n in lora)  # generators: only the interrupted text matters
    assert any(not torch.equal(g1[n], g2[n]) for n in disc)  # the discriminator does read it


def test_policy_gradient_scores_equal_the_sampling_policy() -> None:
    gan = make_gan()
    ro = gan.rollout(batch(6), torch.Generator().manual_seed(3))
    total = 0
    for e, sp in enumerate(gan.speakers):
        s, c = crosstalk_logprobs(sp, e, ro.fake, GCFG.dialogue.temperature)
        for b, t in enumerate(ro.fake):
            sel = [lp for j, (lp, w) in enumerate(zip(t.logprobs, t.speakers)) if w == e and j >= t.crosstalk_start]
            assert c[b].item() == len(sel)
            assert s[b].item() == pytest.approx(sum(sel), abs=1e-3)
            total += len(sel)
    assert total == sum(len(t.ids) - t.crosstalk_start for t in ro.fake)  # every cross-talk token, once
    for r, f in zip(ro.real, ro.fake):  # same opening, same length, no early stop
        assert f.ids[: ro.opening] == r.ids[: ro.opening] and len(f.ids) == len(r.ids) == 16
        assert f.crosstalk_start == ro.opening and r.n_interruptions == 0


def test_training_through_the_loop(tmp_path) -> None:
    gan = make_gan(nonzero=False)
    base0 = [{k: v.clone() for k, v in base_state_dict(m).items()} for m in gan.experts]
    lora0 = {n: p.detach().clone() for n, p in gan.named_parameters() if "lora_B" in n}
    disc0 = {n: p.detach().clone() for n, p in gan.discriminator.named_parameters()}
    data = [{k: v[i] for k, v in batch(8).items()} for i in range(8)]
    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, log_every=1, save_every=0,
                      weight_decay=0.0)
    res = train(gan, gan_loss, data, cfg, out_dir=tmp_path)
    assert res.steps == 3 and int(gan.steps) == 3
    for m, b0 in zip(gan.experts, base0):
        assert all(torch.equal(v, b0[k]) for k, v in base_state_dict(m).items())  # base weights frozen
    assert any(not torch.equal(p, lora0[n]) for n, p in gan.named_parameters() if "lora_B" in n)
    assert any(not torch.equal(p, disc0[n]) for n, p in gan.discriminator.named_parameters())
    assert float(gan.baseline) != 0.0
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    for r in train_recs:
        assert 0.0 <= r["d_acc"] <= 1.0 and -1.0 <= r["reward"] <= 1.0 and r["interruptions"] >= 1
    # rollouts are seeded by the step counter (saved in checkpoints): the same step draws the same texts
    g = make_gan(nonzero=False)
    g.train()
    g.steps.fill_(2)
    a = g.rollout(batch(), g.generator_for(batch()))
    b = g.rollout(batch(), g.generator_for(batch()))
    assert [t.ids for t in a.fake] == [t.ids for t in b.fake]


def test_gan_config_and_construction_errors() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        GANConfig(dialogue=DialogueConfig(temperature=0.0))
    with pytest.raises(ConfigError, match="opening_min"):
        GANConfig(opening_min=5, opening_max=4)
    with pytest.raises(ConfigError, match="reward"):
        GANConfig(reward="sigmoid")
    with pytest.raises(ConfigError, match="no adapter 'crosstalk'"):
        CrosstalkGAN([tiny_expert(1), tiny_expert(2)], ["a", "b"], Discriminator(DiscriminatorConfig(vocab_size=V)), GCFG)
    assert GANConfig.from_dict(GCFG.to_dict()) == GCFG


# ---------------------------------------------------------------------------- discriminator
def test_discriminator_learns_a_separable_toy() -> None:
    # "uninterrupted": tokens 1..10 throughout; "interrupted": the second half switches to 20..30
    g = torch.Generator().manual_seed(0)

    def texts(n: int, switched: bool) -> list[list[int]]:
        out = []
        for _ in range(n):
            k = int(torch.randint(6, 14, (1,), generator=g))
            head = torch.randint(1, 11, (k,), generator=g).tolist()
            lo, hi = (20, 31) if switched else (1, 11)
            tail = torch.randint(lo, hi, (20 - k,), generator=g).tolist()
            out.append(head + tail)
        return out

    torch.manual_seed(0)
    d = Discriminator(DiscriminatorConfig(vocab_size=V, d_model=16, dropout=0.0))
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss, _, _ = discriminator_loss(d(*pad_batch(texts(16, False))), d(*pad_batch(texts(16, True))))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.6 and sum(losses[-5:]) / 5 < 0.1
    with torch.no_grad():
        _, acc_u, acc_i = discriminator_loss(d(*pad_batch(texts(32, False))), d(*pad_batch(texts(32, True))))
    assert acc_u.item() == 1.0 and acc_i.item() == 1.0


def test_discriminator_padding_is_exact_and_save_load(tmp_path) -> None:
    experts = [tiny_expert(1), tiny_expert(2)]
    table = expert_features(experts)
    assert table.shape == (V, 64)  # two own tables side by side
    shared = tiny_expert(3)
    assert expert_features([shared, tiny_expert(4, embedding=shared.embedding)]).shape == (V, 32)  # a shared table once
    torch.manual_seed(0)
    own = Discriminator(DiscriminatorConfig(vocab_size=V, d_model=16, kernel_size=3, n_layers=3)).eval()
    feat = Discriminator(DiscriminatorConfig(vocab_size=V, d_model=16, feature_dim=64), table).eval()
    assert not feat.embedding.weight.requires_grad and torch.equal(feat.embedding.weight, table)
    assert own.cfg.receptive_field == 1 + 2 * 7
    a, b = [3, 4, 5, 6, 7], [8, 9]
    for i, d in enumerate((own, feat)):
        both = d(*pad_batch([a, b]))
        assert torch.allclose(both[0], d(*pad_batch([a]))[0], atol=1e-6)
        assert torch.allclose(both[1], d(*pad_batch([b]))[0], atol=1e-6)
        save_discriminator(d, tmp_path / f"disc{i}")
        d2 = load_discriminator(tmp_path / f"disc{i}")
        assert torch.equal(d2(*pad_batch([a, b])), both)
    with pytest.raises(ConfigError, match="features are"):
        Discriminator(DiscriminatorConfig(vocab_size=V, feature_dim=8), table)
    (tmp_path / "disc0" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_discriminator(tmp_path / "disc0")


def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path) -> None:
    data = [{k: v[i] for k, v in batch(8).items()} for i in range(8)]
    # constant lr (min_lr_ratio = 1), so a 2-step run is a prefix of the 3-step one
    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, progress=False, log_every=1,
                      save_every=1, weight_decay=0.0)
    full = train(make_gan(nonzero=False), gan_loss, data, cfg, out_dir=tmp_path / "full")
    train(make_gan(nonzero=False), gan_loss, data, cfg.replace(max_steps=2), out_dir=tmp_path / "cut")
    resumed_gan = make_gan(nonzero=False)
    resumed = train(resumed_gan, gan_loss, data, cfg, out_dir=tmp_path / "cut")  # continues from step 2
    assert resumed.losses == full.losses and int(resumed_gan.steps) == 3
