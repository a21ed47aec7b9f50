"""Language models whose behaviour differs per batch row, decoded exactly by the shared ``generate``.

Two pipeline steps run one batched decode over rows that need different treatment:

- the **summarizer with a per-row adapter** (:class:`AdapterRowsLM`): rows whose prompt shows
  coding intent run with the coding LoRA adapter, the others without, in the same forward
  (:func:`taskmoe.layers.lora.use_adapter` with a row mask; rows outside the mask get exactly the
  base output);
- the **confidence-weighted ensemble** of the experts-only mode (:class:`EnsembleLM`): every
  row mixes the same experts' next-token distributions with its own router weights,
  ``log p = logsumexp_e(log w_e + log_softmax(logits_e))``
  (:func:`taskmoe.experts.ensemble.mixture_logprobs`).

The difficulty is that :func:`taskmoe.inference.generate.generate` reorders rows (it prefills in
groups of equal prompt length) and drops finished rows, so a fixed per-row mask would point at
the wrong rows. Design choice: the per-row condition (a *tag*: the row's side data) travels
**inside the decoding state** (:class:`TaggedState`, whose ``select``/``cat``/``clone`` move the
tags with the rows). ``generate(..., side=tags)`` hands each prefill group its rows' tags through
``init_state(b, side=...)``, so the wrapper never has to recognise a row by its prompt (identical
prompts may carry different tags) and is not tied to one list of prompts.

Glossary: ``B`` rows in the current forward, ``T`` tokens, ``V`` vocabulary, ``E`` experts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from taskmoe.errors import ConfigError
from taskmoe.experts.ensemble import mixture_logprobs
from taskmoe.models.model import LMOutput
from taskmoe.layers.state import TaggedState
from taskmoe.summarizer.switch import adapters_of, summarizer_adapter

__all__ = ["TaggedState", "RowTaggedLM", "AdapterRowsLM", "EnsembleLM"]


class RowTaggedLM(nn.Module):
    """Base: a decode-only LM whose rows carry tags given at ``init_state(b, side=tags)``.

    Subclasses implement :meth:`init_inner`, :meth:`step` and :meth:`tag` (one row's side data ->
    its tag tensor). ``forward`` needs a prefilled state (it is meant for
    :func:`~taskmoe.inference.generate.generate` with ``side``).
    """

    def tag(self, side: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_inner(self, batch_size: int, device: Any, dtype: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, input_ids: Tensor, inner: Any, tags: Tensor, logits_to_keep: int) -> tuple[Tensor, Any, Tensor]:
        """``(logits (B, T', V), new inner state, hidden (B, T, D))`` for rows tagged ``tags``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None, *,
                   side: Sequence[Any] | None = None) -> TaggedState:
        if side is None:
            raise ConfigError(f"{type(self).__name__} needs each row's side data: decode it with generate(..., side=...)")
        if len(side) != batch_size:
            raise ConfigError(f"{type(self).__name__}: {batch_size} rows but {len(side)} side entries")
        tags = torch.stack([self.tag(x) for x in side]) if batch_size else None
        return TaggedState(self.init_inner(batch_size, device, dtype), tags)

    def forward(self, input_ids: Tensor, state: TaggedState | None = None, *, logits_to_keep: int = 0) -> LMOutput:
        if state is None or state.tags is None:
            raise ConfigError(f"{type(self).__name__} is a decoding wrapper: pass a state from init_state(b, side=...)")
        tags = state.tags.to(input_ids.device)
        logits, inner, hidden = self.step(input_ids, state.inner, tags, logits_to_keep)
        return LMOutput(logits, TaggedState(inner, tags), hidden)


class AdapterRowsLM(RowTaggedLM):
    """``model`` with LoRA adapter ``adapter`` on the rows whose side data is True, off on the others.

    Each forward switches the adapter on with that forward's row mask and restores the previous
    switch state afterwards (:func:`~taskmoe.summarizer.switch.summarizer_adapter`: the LoRA switch,
    or the model's own for a backbone summarizer), so the shared model is left as it was found.
    """

    def __init__(self, model: nn.Module, adapter: str | None) -> None:
        super().__init__()
        if adapter is not None and adapter not in adapters_of(model):
            raise ConfigError(f"AdapterRowsLM: the model has no adapter '{adapter}' (it has {adapters_of(model)})")
        self.model = model
        self.adapter = adapter
        self._has_adapters = bool(adapters_of(model))

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def tag(self, side: Any) -> Tensor:
        if bool(side) and self.adapter is None:
            raise ConfigError("AdapterRowsLM: a row asks for an adapter but none was named")
        return torch.tensor(bool(side))

    def init_inner(self, batch_size: int, device: Any, dtype: Any) -> Any:
        return self.model.init_state(batch_size, device, dtype)

    def step(self, input_ids: Tensor, inner: Any, tags: Tensor, logits_to_keep: int) -> tuple[Tensor, Any, Tensor]:
        if self.adapter is None or not bool(tags.any()):
            name, rows = None, None
        else:
            name, rows = self.adapter, (None if bool(tags.all()) else tags)
        if name is None and not self._has_adapters:
            out = self.model(input_ids, inner, logits_to_keep=logits_to_keep)
        else:
            with summarizer_adapter(self.model, name, rows):
                out = self.model(input_ids, inner, logits_to_keep=logits_to_keep)
        return out.logits, out.state, out.hidden


class EnsembleLM(RowTaggedLM):
    """The mixture ``p(x) = sum_e w_e p_e(x)`` of ``experts``; each row's side data is its weights ``w`` (E,).

    Its "logits" are the mixture's log-probabilities (softmax of log p is p, so sampling,
    temperature and top-k/top-p act on the mixture). ``hidden`` is the weight-averaged hidden
    state of the experts.
    """

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if not experts:
            raise ConfigError("EnsembleLM: no experts")
        vocab = {int(m.vocab_size) for m in experts}
        if len(vocab) != 1:
            raise ConfigError(f"EnsembleLM: experts disagree on the vocabulary size ({sorted(vocab)})")
        self.experts = nn.ModuleList(experts)

    @property
    def vocab_size(self) -> int:
        return int(self.experts[0].vocab_size)

    def tag(self, side: Any) -> Tensor:
        w = torch.as_tensor(side, dtype=torch.float32)
        if w.shape != (len(self.experts),):
            raise ConfigError(f"EnsembleLM: a row's weights must be ({len(self.experts)},), got {tuple(w.shape)}")
        return w

    def init_inner(self, batch_size: int, device: Any, dtype: Any) -> Any:
        return [m.init_state(batch_size, device, dtype) for m in self.experts]

    def step(self, input_ids: Tensor, inner: Any, tags: Tensor, logits_to_keep: int) -> tuple[Tensor, Any, Tensor]:
        outs = [m(input_ids, s, logits_to_keep=logits_to_keep) for m, s in zip(self.experts, inner)]
        w = tags.T.to(outs[0].logits.dtype)  # (E, B)
        logp = mixture_logprobs(torch.stack([o.logits for o in outs]), w)  # (E, B, T', V) -> (B, T', V)
        wn = w / w.sum(0, keepdim=True).clamp_min(1e-12)
        hidden = (torch.stack([o.hidden for o in outs]) * wn[:, :, None, None]).sum(0)  # (B, T, D)
        return logp, [o.state for o in outs], hidden
