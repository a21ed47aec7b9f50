"""``LinearAttention``: multi-head causal linear attention with injected feature map and decay.

Per head (d = head_dim)::

    q, k, v, o_gate = split(proj(x))          # (B, T, H, d) each
    q = phi(q) / sqrt(d),  k = phi(k)          # phi: feature map (identity, or elu+1 > 0)
    g = decay(x)                               # (B, T, H) log decay <= 0, or no decay
    o = linear_attention(q, k, v, g)           # S_t = exp(g_t) S_{t-1} + k_t v_t^T ; o_t = q_t^T S_t
    o = o[:d] / (o[d] + eps)  if normalize     # v carries an extra column of ones -> q.z
    y = out_proj(head_rmsnorm(o) * silu(o_gate))

Choices: the feature map and the decay module are injected (``phi`` any callable; ``decay`` one of
:class:`DataDecay`, :class:`FixedDecay`, or None). The normalized (Katharopoulos) form reuses the
same op by appending a ones column to ``v`` (the state then holds ``z = sum k`` as its last
column); it needs a positive ``phi``, otherwise ``q.z`` can cross zero. A per-head RMSNorm and a
SiLU output gate (as in RetNet / GLA) keep the output scale stable whatever the state magnitude.

Decoding state (:class:`LinearAttentionState`): one ``(d, d)`` (or ``(d, d+1)``) matrix per head,
so a token costs the same at context 10 or 10,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.layers.state import TensorState
from taskmoe.ops import linear_attention, linear_attention_step


def elu_plus_one(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


def identity(x: Tensor) -> Tensor:
    """phi(x) = x (with a decay gate, as in RetNet / GLA)."""
    return x


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {"identity": identity, "elu1": elu_plus_one}


class FixedDecay(nn.Module):
    """RetNet's per-head constant decay: ``gamma_h = 1 - 2**(-5 - h)`` (log decay, not learned)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        gamma = 1.0 - torch.pow(2.0, -5.0 - torch.arange(n_heads, dtype=torch.float64))
        self.register_buffer("log_gamma", gamma.log().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_gamma.to(x.dtype).expand(*x.shape[:-1], -1)  # (B, T, H)


class DataDecay(nn.Module):
    """Input-dependent per-head decay (GLA-style): ``g = logsigmoid(W x + b) / tau``.

    ``tau`` (16, as in GLA) keeps decays near 1; ``b`` starts so that the heads' initial decays
    ``gamma_h`` spread from ``1 - 2**-3`` to ``1 - 2**-9`` (memories of ~8 to ~500 tokens).
    """

    def __init__(self, d_model: int, n_heads: int, tau: float = 16.0) -> None:
        super().__init__()
        self.tau = tau
        self.proj = nn.Linear(d_model, n_heads, bias=True)
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        H = self.proj.out_features
        exps = torch.linspace(3.0, 9.0, H, dtype=torch.float64)
        target = (1.0 - torch.pow(2.0, -exps)) ** self.tau  # sigmoid(b) = gamma**tau
        with torch.no_grad():
            self.proj.weight.normal_(0.0, 0.02)
            self.proj.bias.copy_(torch.logit(target).float())

    def forward(self, x: Tensor) -> Tensor:
        return F.logsigmoid(self.proj(x)) / self.tau  # (B, T, H)


@dataclass
class LinearAttentionState(TensorState):
    kv: Tensor  # (B, H, d, d) or (B, H, d, d + 1) with the normalizer column


class LinearAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        feature_map: Callable[[Tensor], Tensor] = identity,
        decay: nn.Module | None = None,
        normalize: bool = False,
        chunk_size: int = 64,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"LinearAttention: d_model {d_model} not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.feature_map, self.decay, self.normalize = feature_map, decay, normalize
        self.chunk_size, self.eps = chunk_size, eps
        self.proj = nn.Linear(d_model, 4 * d_model, bias=False)  # q, k, v, output gate
        self.head_norm_weight = nn.Parameter(torch.ones(self.head_dim))
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj.residual_out = True

    def extra_repr(self) -> str:
        fm = getattr(self.feature_map, "__name__", type(self.feature_map).__name__)
        return (f"heads={self.n_heads}, head_dim={self.head_dim}, feature_map={fm}, normalize={self.normalize}, "
                f"chunk_size={self.chunk_size}")

    def init_state(self, batch_size: int, device=None, dtype=None) -> LinearAttentionState:
        w = self.proj.weight
        dv = self.head_dim + int(self.normalize)
        return LinearAttentionState(torch.zeros(batch_size, self.n_heads, self.head_dim, dv,
                                                device=device or w.device, dtype=dtype or w.dtype))

    def forward(self, x: Tensor, state: LinearAttentionState | None = None) -> tuple[Tensor, LinearAttentionState | None]:
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim
        q, k, v, gate = self.proj(x).view(B, T, 4, H, d).unbind(2)  # (B, T, H, d) each
        q = self.feature_map(q) * (1.0 / math.sqrt(d))
        k = self.feature_map(k)
        g = None if self.decay is None else self.decay(x)  # (B, T, H)
        if self.normalize:
            v = torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1)  # (B, T, H, d + 1)
        prev = None if state is None else state.kv
        if state is not None and T == 1:
            o, kv = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0], state=prev)
            o = o.unsqueeze(1)  # (B, 1, H, dv)
        else:
            o, kv = linear_attention(q, k, v, g, state=prev, chunk_size=self.chunk_size)
        if self.normalize:
            o = o[..., :d] / (o[..., d:] + self.eps)
        o = F.rms_norm(o, (d,), self.head_norm_weight, self.eps)  # per-head norm
        y = self.out_proj(o.reshape(B, T, D) * F.silu(gate.reshape(B, T, D)))
        return y, (None if state is None else LinearAttentionState(kv))
