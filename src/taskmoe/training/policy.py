"""What the SFT and DPO recipes train: a :class:`Policy` = the module, its frozen reference, how to save it.

The model-side hook of the chat trainers. A recipe never asks what kind of model it holds; it
calls ``policy.model`` (the module the loop trains), ``policy.reference_logits(ids)`` (DPO's
frozen reference, under ``no_grad`` and in eval mode) and ``policy.save(folder)``.

Three ways to build one:

- :func:`lora_policy`: inject a fresh LoRA adapter (:mod:`taskmoe.layers.lora`) into our own
  model and train only it. The reference is **the same model with its adapters switched off**
  (``layers.lora.use_adapter(model, None)``): no second copy of the weights.
- :func:`lora_policy` with ``start=FOLDER`` (DPO after SFT): the SFT adapter is loaded and
  trained further; a frozen copy of *only its A/B matrices* is kept as adapter ``ref``, and the
  reference switches to it, so the reference is the SFT model (as in DPO), still one base copy.
- :func:`full_policy`: every parameter trains; the reference is a frozen deep copy (the only
  case with two copies, as in full fine-tuning with TRL).

A backbone adapter (PEFT layout, ``models/adapters.py``) plugs in by building
``Policy(model, adapter_reference(model, disable=lambda: peft_model.disable_adapter()), save)``:
``disable`` is any zero-argument context-manager factory under which the model runs without its
adapter. Model outputs may be a tensor or have ``.logits`` (our ``LMOutput``, DOE, Hugging Face).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from taskmoe.eval.nll import evaluating
from taskmoe.layers.lora import inject, load_adapter, mark_only_adapter_trainable, save_adapter, set_adapter, use_adapter

REF_ADAPTER = "ref"


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, or its ``.logits``."""
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass
class Policy:
    """A trainable model, its frozen reference's logits, and how to save the trained part."""

    model: nn.Module
    reference_logits: Callable[[torch.Tensor], torch.Tensor]
    save: Callable[[Path], Path]
    kind: str  # "lora" or "full" (or a backbone adapter's own name)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def adapter_reference(model: nn.Module, disable: Callable[[], ContextManager[Any]] | None = None
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reference logits = ``model`` run inside ``disable()`` (default: every LoRA adapter off)."""
    disable = disable or (lambda: use_adapter(model, None))

    def ref(ids: torch.Tensor) -> torch.Tensor:
        with evaluating(model), disable():
            return logits_of(model(ids))

    return ref


def copy_reference(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reference logits from a frozen deep copy of ``model`` as it is now."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def ref(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits_of(frozen(ids.to(next(frozen.parameters()).device)))

    return ref


def lora_policy(model: nn.Module, *, targets: list[str], rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                name: str = "chat", start: str | Path | None = None, meta: dict | None = None) -> Policy:
    """Train LoRA adapter ``name`` on ``model`` (fresh, or loaded from ``start``); see module docstring."""
    disable = None
    if start is not None:
        name = load_adapter(model, start, name=name)
        load_adapter(model, start, name=REF_ADAPTER)
        disable = lambda: use_adapter(model, REF_ADAPTER)  # noqa: E731 - the reference is the starting adapter
    else:
        inject(model, targets, rank=rank, alpha=alpha, adapter_name=name, dropout=dropout)
    mark_only_adapter_trainable(model, name)
    set_adapter(model, name)

    def save(folder: Path) -> Path:
        return save_adapter(model, folder, name, meta=meta)

    return Policy(model, adapter_reference(model, disable), save, "lora")


def full_policy(model: nn.Module, save: Callable[[Path], Path]) -> Policy:
    """Train every parameter; the reference is a frozen copy of the starting weights."""
    model.requires_grad_(True)
    return Policy(model, copy_reference(model), save, "full")
