"""Loss functions against values derived by hand (derivations in each docstring)."""

from __future__ import annotations

import math

import pytest
import torch

from taskmoe.training.losses import dpo_loss, lm_cross_entropy, load_balance_loss, next_token_targets, sequence_logprob

LN3 = math.log(3.0)


def test_lm_cross_entropy_hand_values():
    """logits [0, ln 3] -> softmax [1/4, 3/4].

    pos 0, target 1: -ln(3/4) = ln(4/3); pos 1, target 0: -ln(1/4) = ln 4; pos 2 ignored.
    mean over the 2 counted positions = (ln(4/3) + ln 4) / 2 = ln(16/3) / 2 = 0.836988...
    """
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3], [5.0, -5.0]]], requires_grad=True)  # (1, 3, 2)
    targets = torch.tensor([[1, 0, -100]])
    loss = lm_cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(math.log(16 / 3) / 2, rel=1e-6)
    loss.backward()
    # d/dz of the mean CE = (softmax - onehot) / N; the ignored position gets no gradient
    assert torch.allclose(logits.grad[0, 0], torch.tensor([0.25, -0.25]) / 2)
    assert torch.allclose(logits.grad[0, 1], torch.tensor([-0.75, 0.75]) / 2)
    assert torch.equal(logits.grad[0, 2], torch.zeros(2))
    # bf16 logits are reduced in float32
    assert lm_cross_entropy(logits.detach().bfloat16(), targets).dtype == torch.float32


def test_lm_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = lm_cross_entropy(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_next_token_targets():
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert next_token_targets(ids).tolist() == [[6, 7, -100], [2, 3, -100]]


def test_sequence_logprob_hand_values():
    """seq 0: ln(3/4) (pos 0, target 1 under [0, ln3]) + ln(1/2) (pos 1, [0, 0]) = ln(3/8);
    seq 1: pos 0 masked out (its target -100 is never read), pos 1 target 0 under [ln3, 0]: ln(3/4)."""
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]], [[0.0, LN3], [LN3, 0.0]]])  # (2, 2, 2)
    targets = torch.tensor([[1, 0], [-100, 0]])
    mask = torch.tensor([[1, 1], [0, 1]], dtype=torch.bool)
    out = sequence_logprob(logits, targets, mask)
    assert out.shape == (2,)
    assert torch.allclose(out, torch.tensor([math.log(3 / 8), math.log(3 / 4)]))


def test_dpo_loss_hand_values():
    """beta = 0.5.

    pair 0: pi_w=-1, pi_l=-3, ref_w=-2, ref_l=-2 -> h = (-1+3) - 0 = 2, beta*h = 1,
            loss = -log sigmoid(1) = ln(1 + e^-1) = 0.3132617; r_w = 0.5*(-1+2) = 0.5, r_l = 0.5*(-3+2) = -0.5.
    pair 1: pi_w=-2, pi_l=-1, ref_w=-1, ref_l=-1 -> h = -1, beta*h = -0.5,
            loss = ln(1 + e^0.5) = 0.9740770; r_w = -0.5, r_l = 0.
    mean = (0.3132617 + 0.9740770) / 2 = 0.6436694.
    d loss / d pi_w of pair 0 = -(1/2) * beta * sigmoid(-beta*h) = -0.25 * sigmoid(-1) = -0.0672353.
    """
    pw = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, rw, rl = dpo_loss(pw, torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -1.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.6436694, abs=1e-6)
    assert rw.tolist() == [0.5, -0.5] and rl.tolist() == [-0.5, 0.0]
    assert not rw.requires_grad
    loss.backward()
    assert pw.grad[0].item() == pytest.approx(-0.25 / (1 + math.e), abs=1e-7)


def test_dpo_label_smoothing_hand_value():
    """pair 0 above with eps = 0.1: 0.9 * ln(1 + e^-1) + 0.1 * ln(1 + e^1)
    = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617."""
    t = torch.tensor
    out = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5, label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(0.4132617, abs=1e-6)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), beta=0.0)


def test_load_balance_loss_hand_values():
    """Top-1, N=4, E=2: probs rows (.9,.1) (.8,.2) (.6,.4) (.3,.7), assignments 0,0,0,1.
    f = (3/4, 1/4); P = ((.9+.8+.6+.3)/4, (.1+.2+.4+.7)/4) = (.65, .35);
    L = 2 * (.75*.65 + .25*.35) = 2 * .575 = 1.15. dL/dp_ne = E * f_e / N, i.e. .375 and .125."""
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], requires_grad=True)
    loss = load_balance_loss(probs, torch.tensor([0, 0, 0, 1]))
    assert loss.item() == pytest.approx(1.15, abs=1e-6)
    loss.backward()
    assert torch.allclose(probs.grad, torch.tensor([[0.375, 0.125]]).expand(4, 2))


def test_load_balance_loss_bounds_and_top_k():
    """Uniform -> 1; collapse onto one expert with certainty -> E.
    Top-2 mask [[1,1,0],[1,0,1]]: f = (2,1,1)/4; probs (.5,.3,.2) (.4,.2,.4) -> P = (.45,.25,.3);
    L = 3 * (.5*.45 + .25*.25 + .25*.3) = 3 * .3625 = 1.0875."""
    uniform = torch.full((4, 2), 0.5)
    assert load_balance_loss(uniform, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]]).expand(5, 3)
    assert load_balance_loss(collapsed, torch.zeros(5, dtype=torch.long)).item() == pytest.approx(3.0)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.2, 0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert load_balance_loss(probs, mask).item() == pytest.approx(1.0875, abs=1e-6)
