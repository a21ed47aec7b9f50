"""The gated MLP ``W_down (silu(W_gate x) * W_up x)`` (SwiGLU, Shazeer 2020) in two projection layouts.

- :class:`SwiGLU`: gate and up projections fused in one ``nn.Linear`` (one matmul, one weight
  read when decoding): the from-scratch models.
- :class:`GatedMLP`: separate ``gate_proj``/``up_proj``/``down_proj`` (Hugging Face Llama's names,
  so a converted checkpoint and a PEFT adapter on any of the three map name for name).

The down projection is marked as a residual output so the LM init scales it by ``1/sqrt(2 n_layers)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn



class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.d_hidden = d_hidden
        self.gate_up = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)
        self.down.residual_out = True

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.d_hidden, dim=-1)  # (B, T, d_hidden) each
        return self.down(F.silu(gate) * up)


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, *, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=bias)
        self.down_proj.residual_out = True

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d_hidden) inside
