"""One re-entrant lock per shared backbone, held while its adapter switch is set for a forward pass.

In a backbone system every expert is a named adapter of the *same* model object, and which adapter
runs is module state (:func:`~taskmoe.layers.lora.use_adapter`). Two threads running the model with
different adapters at once (the serving worker decoding while ``/v1/route`` pools the base model's
hidden states) would see each other's switch. Every place that switches adapters on a shared
backbone and runs it holds :func:`switch_lock` for the whole pass, so passes on one backbone are
serialised and each sees its own switch. Re-entrant: a pass may call another (an ensemble).
"""

from __future__ import annotations

import threading

from torch import nn

__all__ = ["switch_lock"]

_ATTR = "_taskmoe_switch_lock"
_GUARD = threading.Lock()


def switch_lock(model: nn.Module) -> threading.RLock:
    """The model's switch lock (created on first use)."""
    lock = model.__dict__.get(_ATTR)
    if lock is None:
        with _GUARD:
            lock = model.__dict__.setdefault(_ATTR, threading.RLock())
    return lock
