"""The encoder protocol every router encoder implements, and what they share.

An encoder maps token-id sequences to one float32 unit row per sequence; a sequence it cannot read
(no known token) gives an all-zero row and ``readable(...) == False``, which the router turns into
its documented fallback. :data:`Trainer` is how a training loop is injected (the router package
sits below ``training``).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from taskmoe.errors import TaskmoeError

__all__ = ["Seqs", "LossFn", "Trainer", "NotFittedError", "Encoder", "normalize_rows", "flatten"]

Seqs = Sequence[Sequence[int]]
LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]
Trainer = Callable[[nn.Module, LossFn, torch.utils.data.Dataset], Any]
"""``trainer(model, loss_fn, dataset)`` trains ``model`` in place for ``dataset.steps`` optimizer
steps of ``dataset.batch_size`` samples, batching with ``dataset.collate``. The training recipe
passes one built on the shared loop (:mod:`taskmoe.training.loop`)."""


class NotFittedError(TaskmoeError, RuntimeError):
    """A router (or one of its parts) was used before it was fitted or loaded."""


@runtime_checkable
class Encoder(Protocol):
    """What the router needs from an encoder."""

    kind: ClassVar[str]

    @property
    def dim(self) -> int: ...

    @property
    def fitted(self) -> bool: ...

    def fit(self, seqs: Seqs, *, trainer: Trainer | None = None, special_ids: Iterable[int] = ()) -> "Encoder":
        """Fit on token-id sequences; ``special_ids`` are never treated as content tokens."""
        ...

    def encode(self, seqs: Seqs) -> np.ndarray:
        """``(N, D)`` float32 unit rows; all-zero rows for unreadable sequences."""
        ...

    def readable(self, seqs: Seqs) -> np.ndarray:
        """``(N,)`` bool: the sequence holds at least one token the encoder knows."""
        ...

    def config_dict(self) -> dict[str, Any]: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...


def normalize_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0).astype(np.float32)


def flatten(seqs: Seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate sequences for ``embedding_bag``: ``ids (sum len,)``, ``offsets (N,)``."""
    lens = [len(s) for s in seqs]
    offsets = torch.tensor([0] + list(np.cumsum(lens)[:-1]) if lens else [], dtype=torch.long)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long) if sum(lens) else torch.zeros(0, dtype=torch.long)
    return ids, offsets
