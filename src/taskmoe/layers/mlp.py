"""``SwiGLU``: the gated MLP ``W_down (silu(W_gate x) * W_up x)`` (Shazeer, 2020).

The gate and up projections are one fused ``nn.Linear`` (one matmul, one
weight read when decoding). ``down`` is marked as a residual output so the LM init scales it by
``1/sqrt(2 n_layers)``.
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
