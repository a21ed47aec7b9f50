"""``Block``: a pre-norm residual block around an injected mixer and an optional MLP.

::

    x = x + dropout(mixer(norm1(x), state.mixer))
    x = x + dropout(mlp(norm2(x)[, state.mlp]))        # when an MLP is given

The block knows nothing about what it wraps (mamba's ``Block(mixer_cls, mlp_cls)`` habit): the
mixer is any *sequence module* ``forward(x, state=None) -> (y, state)`` with
``init_state(batch_size, device, dtype)``; the MLP is either a plain ``forward(x) -> y`` module
(SwiGLU) or, if it defines ``init_state``, a sequence module too (a sequence-routed MoE layer that
must remember its routing decision while decoding). ``state=None`` means a stateless full-sequence
pass (training) and returns ``None`` as the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.layers.norm import RMSNorm
from taskmoe.layers.state import clone_state, select_state, cat_states


def is_stateful(module: nn.Module | None) -> bool:
    """A module that takes and returns a decoding state (it defines ``init_state``)."""
    return module is not None and callable(getattr(module, "init_state", None))


@dataclass
class BlockState:
    mixer: Any
    mlp: Any = None

    def select(self, rows) -> "BlockState":
        return BlockState(select_state(self.mixer, rows), select_state(self.mlp, rows))

    @classmethod
    def cat(cls, states) -> "BlockState":
        return BlockState(cat_states([s.mixer for s in states]), cat_states([s.mlp for s in states]))

    def clone(self) -> "BlockState":
        return BlockState(clone_state(self.mixer), clone_state(self.mlp))


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, mlp: nn.Module | None = None, *, d_model: int,
                 eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(d_model, eps)
        self.mixer = mixer
        self.norm2 = RMSNorm(d_model, eps) if mlp is not None else None
        self.mlp = mlp
        self.dropout = dropout

    def init_state(self, batch_size: int, device=None, dtype=None) -> BlockState:
        mlp = self.mlp.init_state(batch_size, device, dtype) if is_stateful(self.mlp) else None
        return BlockState(self.mixer.init_state(batch_size, device, dtype), mlp)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState | None]:
        y, mixer_state = self.mixer(self.norm1(x), None if state is None else state.mixer)
        x = x + self._drop(y)
        mlp_state = None
        if self.mlp is not None:
            h = self.norm2(x)
            if is_stateful(self.mlp):
                y, mlp_state = self.mlp(h, None if state is None else state.mlp)
            else:
                y = self.mlp(h)
            x = x + self._drop(y)
        return x, (None if state is None else BlockState(mixer_state, mlp_state))
