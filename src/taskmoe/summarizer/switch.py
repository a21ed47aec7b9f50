"""Switching a summarizer's adapters, whichever kind of summarizer it is.

Two summarizers share the pipeline: the SSM summarizer, whose coding adapter is an ordinary LoRA
adapter in its own module tree (switched with :func:`taskmoe.layers.lora.use_adapter`, rows outside
the mask get the base summarizer), and the backbone summarizer
(:class:`~taskmoe.summarizer.backbone_summarizer.BackboneSummarizer`), whose *base* is itself an
adapter (the fusion adapter of a backbone shared with the experts), so "adapter off" on a row means
"fusion adapter", not "bare backbone". Design choice: a summarizer that owns its switching says so
by having ``switch_adapter(name, rows)`` (a context manager) and ``adapter_names()``; every call
site (Fuse, Assess, :mod:`taskmoe.eval.fusion`) goes through :func:`summarizer_adapter` and
:func:`adapters_of` and never needs to know which summarizer it holds.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from taskmoe.layers.lora import adapter_names, use_adapter

__all__ = ["summarizer_adapter", "adapters_of"]


def adapters_of(model: nn.Module) -> list[str]:
    """The adapters a summarizer can switch on (its own list, else the LoRA adapters in its tree)."""
    own = getattr(model, "adapter_names", None)
    return list(own()) if callable(own) else adapter_names(model)


@contextlib.contextmanager
def summarizer_adapter(model: nn.Module, name: str | None, rows: torch.Tensor | None = None) -> Iterator[nn.Module]:
    """Run ``model`` with adapter ``name`` on ``rows`` (all rows when None; None: no extra adapter)."""
    own = getattr(model, "switch_adapter", None)
    ctx = own(name, rows) if callable(own) else use_adapter(model, name, rows)
    with ctx:
        yield model
