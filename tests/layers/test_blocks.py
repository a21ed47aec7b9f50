"""Layer contracts: hand-derived values, causality, receptive field, config validation, learning."""

from __future__ import annotations

import math

import pytest
import torch

from taskmoe.errors import ConfigError
from taskmoe.layers import SSM, Attention, Block, LinearAttention, RMSNorm, SwiGLU, TemporalConv, elu_plus_one
from taskmoe.models import expert_lm, summarizer_lm, transformer_lm
from taskmoe.models.config import ExpertLMConfig, LinearAttentionConfig, LMConfig, SSMConfig, SummarizerLMConfig
from taskmoe.models.config import TransformerLMConfig
from taskmoe.layers.linear_attention import DataDecay


def test_rmsnorm_hand_value() -> None:
    """x = (3, 4): rms = sqrt((9 + 16) / 2) = sqrt(12.5); with gain (1, 2): (3, 8) / sqrt(12.5)."""
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(norm(torch.tensor([[3.0, 4.0]])), torch.tensor([[3.0, 8.0]]) / math.sqrt(12.5))


def test_swiglu_formula() -> None:
    mlp = SwiGLU(4, 6)
    x = torch.randn(2, 3, 4)
    g, u = (x @ mlp.gate_up.weight.T).split(6, -1)
    torch.testing.assert_close(mlp(x), (torch.nn.functional.silu(g) * u) @ mlp.down.weight.T)


@pytest.mark.parametrize("mixer", [
    lambda: TemporalConv(8, kernel_size=3, n_levels=3),
    lambda: LinearAttention(8, 2, decay=DataDecay(8, 2), chunk_size=4),
    lambda: SSM(8, d_state=4, chunk_size=3),
    lambda: Attention(8, 2),
], ids=["tcn", "linear-attention", "ssm", "attention"])
def test_mixers_are_causal(mixer) -> None:
    m = mixer()
    x = torch.randn(2, 12, 8)
    y, _ = m(x)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 8)  # change the future only
    y2, _ = m(x2)
    torch.testing.assert_close(y[:, :7], y2[:, :7])
    assert not torch.allclose(y[:, 7:], y2[:, 7:])


def test_temporal_conv_receptive_field() -> None:
    """K=3, dilations 1,2,4: sees 1 + 2*(1+2+4) = 15 tokens: the gradient at t=20 reaches t=6, not t=5."""
    m = TemporalConv(4, kernel_size=3, n_levels=3)
    assert m.receptive_field == 15
    x = torch.randn(1, 21, 4, requires_grad=True)
    m(x)[0][0, 20].sum().backward()
    reach = x.grad[0].abs().sum(-1) > 0
    assert reach[6:].all() and not reach[:6].any()


def test_normalized_linear_attention_formula() -> None:
    """normalize=True: o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps) with z_t = sum_{s<=t} phi(k_s)."""
    la = LinearAttention(4, 1, feature_map=elu_plus_one, normalize=True)
    x = torch.randn(1, 5, 4)
    q, k, v, gate = (x @ la.proj.weight.T).split(4, -1)
    q, k = elu_plus_one(q) / 2.0, elu_plus_one(k)  # 1/sqrt(head_dim = 4)
    outs = []
    for t in range(5):
        S = k[0, : t + 1].T @ v[0, : t + 1]  # (4, 4)
        z = k[0, : t + 1].sum(0)
        outs.append(q[0, t] @ S / (q[0, t] @ z + la.eps))
    o = torch.stack(outs)
    o = torch.nn.functional.rms_norm(o, (4,), la.head_norm_weight, la.eps) * torch.nn.functional.silu(gate[0])
    torch.testing.assert_close(la(x)[0][0], o @ la.out_proj.weight.T)


class CountingMLP(torch.nn.Module):
    """A stateful MLP (the DOE hook): adds the number of tokens seen so far, carried in its state."""

    def init_state(self, batch_size, device=None, dtype=None):
        from taskmoe.layers.state import TensorState
        from dataclasses import make_dataclass
        Counter = make_dataclass("Counter", [("n", torch.Tensor)], bases=(TensorState,))
        return Counter(torch.zeros(batch_size, 1, 1))

    def forward(self, x, state=None):
        n0 = torch.zeros(x.shape[0], 1, 1) if state is None else state.n
        pos = n0 + torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
        return x * 0 + pos, (None if state is None else type(state)(n0 + x.shape[1]))


def test_block_threads_state_into_a_stateful_mlp() -> None:
    blk = Block(TemporalConv(4, n_levels=1), CountingMLP(), d_model=4)
    x = torch.randn(2, 6, 4)
    full, _ = blk(x)
    st = blk.init_state(2)
    a, st = blk(x[:, :4], st)
    b, st = blk(x[:, 4:5], st)
    c, st = blk(x[:, 5:], st)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full)


@pytest.mark.parametrize("make,match", [
    (lambda: LMConfig(d_model=30, n_heads=4), "divisible by n_heads"),
    (lambda: LinearAttentionConfig(normalize=True), "positive feature map"),
    (lambda: LinearAttentionConfig(decay="sometimes"), "LinearAttentionConfig.decay"),
    (lambda: ExpertLMConfig(n_layers=0), "ExpertLMConfig.n_layers"),
    (lambda: SSMConfig(state=0), "SSMConfig.state"),
    (lambda: TransformerLMConfig(rope_base=1.0), "rope_base"),
])
def test_config_validation(make, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_config_round_trip_rejects_unknown_keys() -> None:
    cfg = SummarizerLMConfig(d_model=64, n_heads=2)
    assert SummarizerLMConfig.from_dict(cfg.to_dict()) == cfg and cfg.mlp_dim == 192 and cfg.dt_rank == 4
    with pytest.raises(ConfigError, match="unknown field"):
        SummarizerLMConfig.from_dict({**cfg.to_dict(), "d_modle": 3})
    with pytest.raises(ConfigError, match="unknown field"):
        SummarizerLMConfig.from_dict({**cfg.to_dict(), "ssm": {"state": 4, "sate": 2}})


@pytest.mark.parametrize("builder", [expert_lm, summarizer_lm, transformer_lm], ids=lambda b: b.__name__)
def test_models_learn_a_repeating_sequence(builder) -> None:
    """Gradients flow end to end: 40 Adam steps cut the loss on a fixed periodic sequence by > 3x."""
    model = builder(LMConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2))  # each builder's defaults
    ids = torch.tensor([[1, 5, 3, 9, 2, 7] * 6])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses[::10]
