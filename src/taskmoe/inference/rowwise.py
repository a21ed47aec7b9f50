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
the wrong rows. Design choice: the per-row condition (a *tag*) travels **inside the decoding
state** (:class:`TaggedState`, whose ``select``/``cat``/``clone`` move the tags with the rows),
and it is attached at prefill by looking each prompt up: the wrapper is built for one call with
the list of prompts and their tags, and the prefill forward (the only call that sees whole
prompts) maps each input row to its tag. Identical prompts must carry identical tags (checked:
the pipeline's tags are functions of the prompt, so they do). ``generate`` itself stays
untouched and unaware of any of this.

Glossary: ``B`` rows in the current forward, ``T`` tokens, ``V`` vocabulary, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from taskmoe.errors import ConfigError
from taskmoe.experts.ensemble import mixture_logprobs
from taskmoe.layers.lora import adapter_names, use_adapter
from taskmoe.models.model import LMOutput
from taskmoe.layers.state import cat_states, clone_state, select_state

__all__ = ["TaggedState", "RowTaggedLM", "AdapterRowsLM", "EnsembleLM"]


@dataclass
class TaggedState:
    """The wrapped model(s)' state plus one tag per row (``tags`` (B, ...); None before prefill)."""

    inner: Any
    tags: Tensor | None

    def select(self, rows: Tensor) -> "TaggedState":
        return TaggedState(select_state(self.inner, rows), None if self.tags is None else self.tags[rows])

    @classmethod
    def cat(cls, states: Sequence["TaggedState"]) -> "TaggedState":
        if any(s.tags is None for s in states):
            raise ConfigError("TaggedState.cat: a state has not been prefilled (no tags)")
        return TaggedState(cat_states([s.inner for s in states]), torch.cat([s.tags for s in states]))

    def clone(self) -> "TaggedState":
        return TaggedState(clone_state(self.inner), None if self.tags is None else self.tags.clone())


class RowTaggedLM(nn.Module):
    """Base: a decode-only LM whose rows carry tags looked up from their prompts at prefill.

    Subclasses implement :meth:`init_inner` and :meth:`step`. ``forward`` needs a state (it is
    meant for :func:`~taskmoe.inference.generate.generate`, which always passes one).
    """

    def __init__(self, prompts: Sequence[Sequence[int]], tags: Tensor) -> None:
        super().__init__()
        if len(prompts) != tags.shape[0]:
            raise ConfigError(f"{type(self).__name__}: {len(prompts)} prompts but {tags.shape[0]} tags")
        self._tag_of: dict[tuple[int, ...], Tensor] = {}
        for p, t in zip(prompts, tags):
            key = tuple(int(x) for x in p)
            old = self._tag_of.get(key)
            if old is not None and not torch.equal(old, t):
                raise ConfigError(f"{type(self).__name__}: two identical prompts carry different tags; "
                                  "decode them in separate calls")
            self._tag_of[key] = t

    def tags_for(self, input_ids: Tensor) -> Tensor:
        """The tags of prefill rows, found by their whole prompt."""
        try:
            return torch.stack([self._tag_of[tuple(row)] for row in input_ids.tolist()])
        except KeyError:
            raise ConfigError(f"{type(self).__name__}: prefill row is not one of the prompts it was built for") from None

    def init_inner(self, batch_size: int, device: Any, dtype: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, input_ids: Tensor, inner: Any, tags: Tensor, logits_to_keep: int) -> tuple[Tensor, Any, Tensor]:
        """``(logits (B, T', V), new inner state, hidden (B, T, D))`` for rows tagged ``tags``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> TaggedState:
        return TaggedState(self.init_inner(batch_size, device, dtype), None)

    def forward(self, input_ids: Tensor, state: TaggedState | None = None, *, logits_to_keep: int = 0) -> LMOutput:
        if state is None:
            raise ConfigError(f"{type(self).__name__} is a decoding wrapper: pass a state from init_state()")
        tags = state.tags if state.tags is not None else self.tags_for(input_ids).to(input_ids.device)
        logits, inner, hidden = self.step(input_ids, state.inner, tags, logits_to_keep)
        return LMOutput(logits, TaggedState(inner, tags), hidden)


class AdapterRowsLM(RowTaggedLM):
    """``model`` with LoRA adapter ``adapter`` on the rows whose tag is True, off on the others.

    Each forward switches the adapter on with that forward's row mask and restores the previous
    switch state afterwards (:func:`~taskmoe.layers.lora.use_adapter`), so the shared model is left
    as it was found.
    """

    def __init__(self, model: nn.Module, adapter: str | None, prompts: Sequence[Sequence[int]], use: Sequence[bool]) -> None:
        flags = torch.tensor([bool(u) for u in use], dtype=torch.bool)
        super().__init__(prompts, flags)
        if adapter is None and bool(flags.any()):
            raise ConfigError("AdapterRowsLM: rows ask for an adapter but none was named")
        if adapter is not None and adapter not in adapter_names(model):
            raise ConfigError(f"AdapterRowsLM: the model has no adapter '{adapter}' (it has {adapter_names(model)})")
        self.model = model
        self.adapter = adapter
        self._has_adapters = bool(adapter_names(model))

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

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
            with use_adapter(self.model, name, rows):
                out = self.model(input_ids, inner, logits_to_keep=logits_to_keep)
        return out.logits, out.state, out.hidden


class EnsembleLM(RowTaggedLM):
    """The mixture ``p(x) = sum_e w_e p_e(x)`` of ``experts``, with per-row weights ``w`` (N, E).

    Its "logits" are the mixture's log-probabilities (softmax of log p is p, so sampling,
    temperature and top-k/top-p act on the mixture). ``hidden`` is the weight-averaged hidden
    state of the experts.
    """

    def __init__(self, experts: Sequence[nn.Module], prompts: Sequence[Sequence[int]], weights: Tensor) -> None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.dim() != 2 or weights.shape[1] != len(experts):
            raise ConfigError(f"EnsembleLM: weights must be (prompts, {len(experts)}), got {tuple(weights.shape)}")
        super().__init__(prompts, weights)
        if not experts:
            raise ConfigError("EnsembleLM: no experts")
        vocab = {int(m.vocab_size) for m in experts}
        if len(vocab) != 1:
            raise ConfigError(f"EnsembleLM: experts disagree on the vocabulary size ({sorted(vocab)})")
        self.experts = nn.ModuleList(experts)

    @property
    def vocab_size(self) -> int:
        return int(self.experts[0].vocab_size)

    def init_inner(self, batch_size: int, device: Any, dtype: Any) -> Any:
        return [m.init_state(batch_size, device, dtype) for m in self.experts]

    def step(self, input_ids: Tensor, inner: Any, tags: Tensor, logits_to_keep: int) -> tuple[Tensor, Any, Tensor]:
        outs = [m(input_ids, s, logits_to_keep=logits_to_keep) for m, s in zip(self.experts, inner)]
        w = tags.T.to(outs[0].logits.dtype)  # (E, B)
        logp = mixture_logprobs(torch.stack([o.logits for o in outs]), w)  # (E, B, T', V) -> (B, T', V)
        wn = w / w.sum(0, keepdim=True).clamp_min(1e-12)
        hidden = (torch.stack([o.hidden for o in outs]) * wn[:, :, None, None]).sum(0)  # (B, T, D)
        return logp, [o.state for o in outs], hidden
