"""``CausalLM``: token embedding -> injected blocks -> final RMSNorm -> output head (tied by default).

Design choices:

- **Injection.** The embedding and the blocks are built outside (see :mod:`taskmoe.models.builders`)
  and passed in. Passing one ``nn.Embedding`` to several models shares it (IMoE experts share the
  router's vocabulary and embedding); the output head is always tied to it.
- **Explicit state.** ``forward(ids, state)`` returns the next :class:`~taskmoe.layers.state.LMState`;
  no module remembers anything between calls, so states can be selected, concatenated and
  cloned (batching, grouping by expert, branching). ``state=None`` is the training pass.
- **One-forward ragged prefill.** When every block is attention (KV cache) with a stateless MLP
  (:attr:`CausalLM.supports_padded_prefill`), prompts of different lengths can be prefilled in one
  right-padded forward: ``forward(ids, fresh_state, lengths=...)`` returns each row's logits at its
  last real token and KV caches whose per-row ``lengths`` drop the padding. Exact: causal attention
  never lets a real token see a later pad, and the pad slots are masked and overwritten later.
- **Tied head.** The output head is the embedding matrix unless an untied ``lm_head`` is passed
  (pretrained backbones that do not tie, see :mod:`taskmoe.models.backbones`); ``logits_to_keep``
  skips the head for positions nobody reads (prefill needs only the last one).
- **Init** (:func:`init_lm_weights`): every projection and the embedding ~ N(0, std); residual
  output projections (marked ``residual_out``) ~ N(0, std / sqrt(2 n_layers)) (GPT-2); then each
  module's own ``reset_special_parameters`` (SSM dt/A, decay biases, conv filters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.layers.norm import RMSNorm
from taskmoe.layers.state import LMState
from taskmoe.config import Config


@dataclass
class LMOutput:
    logits: Tensor  # (B, T, V), or (B, logits_to_keep, V)
    state: LMState | None  # the state after the last input token (None in a stateless pass)
    hidden: Tensor  # (B, T, D): final-norm hidden states (the input of the head)


class CausalLM(nn.Module):
    def __init__(
        self,
        embedding: nn.Embedding,
        blocks: Iterable[nn.Module],
        norm: nn.Module | None = None,
        *,
        config: Config | None = None,
        builder: str | None = None,
        lm_head: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        d_model = embedding.embedding_dim
        self.norm = norm if norm is not None else RMSNorm(d_model, getattr(config, "norm_eps", 1e-5))
        self.config = config
        self.builder = builder  # name of the builder that can rebuild this model (for load_lm)
        self.lm_head = lm_head  # None: the head is the embedding (tied)

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    @property
    def d_model(self) -> int:
        return self.embedding.embedding_dim

    def num_params(self) -> int:
        """Parameters counted once each (a tied head is the embedding)."""
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> LMState:
        w = self.embedding.weight
        device, dtype = device or w.device, dtype or w.dtype
        return LMState([blk.init_state(batch_size, device, dtype) for blk in self.blocks])

    def head(self, hidden: Tensor) -> Tensor:
        """Logits (..., V) of final hidden states (..., D)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.embedding.weight)

    @property
    def supports_padded_prefill(self) -> bool:
        """True when every block is attention with a KV cache and a stateless MLP (see the module docstring)."""
        from taskmoe.layers.attention import Attention, GQAttention
        from taskmoe.layers.block import Block, is_stateful

        return all(isinstance(b, Block) and isinstance(b.mixer, (Attention, GQAttention)) and not is_stateful(b.mlp)
                   for b in self.blocks)

    def forward(self, input_ids: Tensor, state: LMState | None = None, *, logits_to_keep: int = 0,
                lengths: Tensor | None = None) -> LMOutput:
        """``input_ids`` (B, T) -> logits (B, T, V); with a state, continue decoding from it.

        ``lengths`` (B,): a right-padded ragged prefill from a fresh state (module docstring); the
        logits are then (B, 1, V) at each row's last real token.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"CausalLM: input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        if state is not None and len(state.layers) != len(self.blocks):
            raise ValueError(f"CausalLM: state has {len(state.layers)} layers, model has {len(self.blocks)}")
        x = self.embedding(input_ids)  # (B, T, D)
        new_layers = []
        for i, blk in enumerate(self.blocks):
            x, s = blk(x, None if state is None else state.layers[i])
            new_layers.append(s)
        hidden = self.norm(x)
        if lengths is not None:
            return self._padded_output(hidden, new_layers, lengths, state)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return LMOutput(self.head(kept), None if state is None else LMState(new_layers), hidden)

    def _padded_output(self, hidden: Tensor, layers: list, lengths: Tensor, state: LMState | None) -> LMOutput:
        if state is None or not self.supports_padded_prefill:
            raise ValueError("CausalLM: lengths= needs a fresh decoding state and attention-only blocks "
                             "(supports_padded_prefill)")
        import dataclasses

        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1].unsqueeze(1)  # (B, 1, D)
        fixed = [dataclasses.replace(s, mixer=dataclasses.replace(s.mixer, lengths=lengths.to(s.mixer.lengths)))
                 for s in layers]
        return LMOutput(self.head(last), LMState(fixed), hidden)



def init_lm_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2-style init, then every module's own ``reset_special_parameters``."""
    resid_std = std / math.sqrt(2 * max(1, n_layers))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, resid_std if getattr(m, "residual_out", False) else std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
    for m in model.modules():
        reset = getattr(m, "reset_special_parameters", None)
        if callable(reset):
            reset()
