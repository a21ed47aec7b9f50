"""``SSM``: the Mamba mixer (selective state-space block) over :func:`taskmoe.ops.selective_scan`.

Glossary (Mamba paper names)::

    x, z   = split(in_proj(u))                    # (B, T, E) each, E = expand * d_model
    x      = silu(causal_conv(x))                 # short depthwise conv, K = d_conv taps
    dt, Bm, Cm = split(x_proj(x))                 # (B, T, R), (B, T, N), (B, T, N)
    dt     = softplus(dt_proj(dt))                # (B, T, E): Delta, low-rank (R) then per channel
    A      = -exp(A_log)                          # (E, N), diagonal, negative
    y      = selective_scan(x, dt, A, Bm, Cm, D, z)   # h_t = exp(dt A) h + dt x B ; y = h C + D x ; * silu(z)
    out    = out_proj(y)

Initialization follows Mamba: ``A = -(1..N)`` per channel (S4D-real), ``D = 1``, and the dt bias is
the inverse softplus of a log-uniform sample in ``[dt_min, dt_max]``.

Decoding state (:class:`SSMState`): the conv buffer ``(B, E, K-1)`` and the scan state ``(B, E, N)``,
both independent of the context length; a single-token call takes the ``*_step`` ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.layers.state import TensorState
from taskmoe.ops import causal_conv, causal_conv_step, selective_scan, selective_scan_step


@dataclass
class SSMState(TensorState):
    conv: Tensor  # (B, E, d_conv - 1)
    ssm: Tensor  # (B, E, N)


class SSM(nn.Module):
    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | None = None,
        chunk_size: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        E = self.d_inner = expand * d_model
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.chunk_size, self.dt_min, self.dt_max = chunk_size, dt_min, dt_max
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(E, d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(E))
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, d_state))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=False)
        self.out_proj.residual_out = True
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        E, N = self.d_inner, self.d_state
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.d_conv)
            self.conv_weight.uniform_(-bound, bound)
            self.conv_bias.zero_()
            std = self.dt_rank**-0.5
            self.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(E) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
            dt = dt.clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N))
            self.D.fill_(1.0)

    def init_state(self, batch_size: int, device=None, dtype=None) -> SSMState:
        w = self.in_proj.weight
        kw = dict(device=device or w.device, dtype=dtype or w.dtype)
        return SSMState(torch.zeros(batch_size, self.d_inner, self.d_conv - 1, **kw),
                        torch.zeros(batch_size, self.d_inner, self.d_state, **kw))

    def forward(self, u: Tensor, state: SSMState | None = None) -> tuple[Tensor, SSMState | None]:
        x, z = self.in_proj(u).split(self.d_inner, dim=-1)  # (B, T, E) each
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))  # (E, N), >= fp32 as in mamba-ssm
        step = state is not None and u.shape[1] == 1
        if step:
            x, z = x[:, 0], z[:, 0]  # (B, E)
            x, conv = causal_conv_step(x, self.conv_weight, self.conv_bias, state=state.conv)
        else:
            x, conv = causal_conv(x, self.conv_weight, self.conv_bias, state=None if state is None else state.conv)
        x = F.silu(x)
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (B, [T,] E)
        if step:
            y, h = selective_scan_step(x, dt, A, Bm, Cm, self.D, z, state=state.ssm)
            y = y.unsqueeze(1)  # (B, 1, E)
        else:
            y, h = selective_scan(x, dt, A, Bm, Cm, self.D, z, state=None if state is None else state.ssm,
                                  chunk_size=self.chunk_size)
        return self.out_proj(y), (None if state is None else SSMState(conv, h))
