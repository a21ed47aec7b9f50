"""Explicit decoding state: plain dataclasses of tensors, batch dimension first.

No module keeps hidden state between calls. A layer's ``forward(x, state)`` returns
``(y, new_state)``; the model threads an :class:`LMState` (one entry per block) through.

Every state supports three batch operations that generation and the inference engine need:

- ``select(rows)`` keeps the given batch rows (e.g. drop finished sequences, group by expert),
- ``cat(states)`` (classmethod) stacks states of equal structure along the batch (e.g. merge
  prompts prefilled in separate length groups),
- ``clone()`` deep-copies (states are values; branching from an old state needs a copy because the
  KV cache writes into a shared, preallocated buffer).

:class:`TensorState` implements them for states whose fields are all batch-first tensors (or
tuples of them); :class:`taskmoe.layers.attention.KVCache` overrides ``cat`` because rows can hold
different lengths. :func:`select_state` / :func:`cat_states` / :func:`clone_state` apply the same
operations to ``None``, tuples and lists, so blocks can nest states freely.
:class:`TaggedState` wraps a model's state with one tag per row (per-row side data such as an
adapter id) that moves with its row through every select/cat.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
from torch import Tensor

from taskmoe.errors import ConfigError

S = TypeVar("S", bound="TensorState")


def _map(value: Any, fn) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    return value


def _cat(values: Sequence[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(list(values), dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([v[i] for v in values]) for i in range(len(first)))
    return first


@dataclass
class TensorState:
    """Base for states whose fields are batch-first tensors (or tuples/lists of them)."""

    def select(self: S, rows: Tensor) -> S:
        return dataclasses.replace(self, **{f.name: _map(getattr(self, f.name), lambda t: t[rows])
                                            for f in dataclasses.fields(self)})

    @classmethod
    def cat(cls: type[S], states: Sequence[S]) -> S:
        return cls(**{f.name: _cat([getattr(s, f.name) for s in states]) for f in dataclasses.fields(cls)})

    def clone(self: S) -> S:
        return dataclasses.replace(self, **{f.name: _map(getattr(self, f.name), lambda t: t.clone())
                                            for f in dataclasses.fields(self)})


def select_state(state: Any, rows: Tensor) -> Any:
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(select_state(s, rows) for s in state)
    return state.select(rows)


def cat_states(states: Sequence[Any]) -> Any:
    first = states[0]
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(cat_states([s[i] for s in states]) for i in range(len(first)))
    return type(first).cat(states)


def clone_state(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(clone_state(s) for s in state)
    return state.clone()


@dataclass
class LMState:
    """The decoding state of a :class:`~taskmoe.models.model.CausalLM`: one entry per block."""

    layers: list[Any]

    def select(self, rows: Tensor) -> "LMState":
        return LMState([select_state(s, rows) for s in self.layers])

    @classmethod
    def cat(cls, states: Sequence["LMState"]) -> "LMState":
        return LMState([cat_states([s.layers[i] for s in states]) for i in range(len(states[0].layers))])

    def clone(self) -> "LMState":
        return LMState([clone_state(s) for s in self.layers])


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
