"""``TemporalConv``: a gated TCN mixer, stacked dilated depthwise causal convolutions.

Design::

    u, g = split(in_proj(x))                       # (B, T, E) each
    for level i = 0 .. n_levels-1:                 # dilation 2**i: receptive field doubles per level
        u = u + causal_conv(u, w_i, b_i, dilation=2**i, gate=g)     # conv(u) * silu(g)
    y = out_proj(u)

Each level is residual (the TCN habit) and gated by the same input-dependent gate, a GLU-style
multiplicative interaction; channel mixing happens only in the two projections. With kernel K and
L levels one block sees ``1 + (K - 1)(2**L - 1)`` past tokens (31 for K=3, L=4).

Decoding keeps one rolling buffer per level (:class:`ConvState`): O(E K L) per token, flat in the
context length. A single-token call with a state takes the :func:`~taskmoe.ops.causal_conv_step` path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from taskmoe.layers.state import TensorState
from taskmoe.ops import causal_conv, causal_conv_step


@dataclass
class ConvState(TensorState):
    buffers: tuple[Tensor, ...]  # per level (B, E, (K - 1) * 2**i): the last inputs, oldest first


class TemporalConv(nn.Module):
    def __init__(self, d_model: int, *, kernel_size: int = 3, n_levels: int = 4, expand: int = 1) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.kernel_size = kernel_size
        self.dilations = [2**i for i in range(n_levels)]
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(n_levels, self.d_inner, kernel_size))
        self.conv_bias = nn.Parameter(torch.zeros(n_levels, self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.out_proj.residual_out = True
        self.reset_special_parameters()

    def reset_special_parameters(self) -> None:
        """Depthwise filters: uniform in +-1/sqrt(K) (the fan-in of one tap row), zero bias."""
        bound = 1.0 / math.sqrt(self.kernel_size)
        with torch.no_grad():
            self.conv_weight.uniform_(-bound, bound)
            self.conv_bias.zero_()

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * sum(self.dilations)

    def init_state(self, batch_size: int, device=None, dtype=None) -> ConvState:
        w = self.conv_weight
        return ConvState(tuple(
            torch.zeros(batch_size, self.d_inner, (self.kernel_size - 1) * d, device=device or w.device, dtype=dtype or w.dtype)
            for d in self.dilations
        ))

    def forward(self, x: Tensor, state: ConvState | None = None) -> tuple[Tensor, ConvState | None]:
        u, g = self.in_proj(x).split(self.d_inner, dim=-1)  # (B, T, E) each
        step = state is not None and x.shape[1] == 1
        if step:
            u, g = u[:, 0], g[:, 0]  # (B, E)
        buffers = []
        for i, d in enumerate(self.dilations):
            prev = None if state is None else state.buffers[i]
            fn = causal_conv_step if step else causal_conv
            du, buf = fn(u, self.conv_weight[i], self.conv_bias[i], dilation=d, gate=g, state=prev)
            u = u + du
            buffers.append(buf)
        if step:
            u = u.unsqueeze(1)  # (B, 1, E)
        return self.out_proj(u), (None if state is None else ConvState(tuple(buffers)))
