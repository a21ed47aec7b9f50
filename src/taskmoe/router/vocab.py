"""Corpus statistics over token ids, shared by the learned encoder's pooling and the complexity scorer.

Holds, per vocabulary id, the corpus count and document frequency, and derives from them:

- ``unigram_p``: add-one smoothed unigram probability ``p(t) = (n_t + 1) / (N + V)``,
- ``idf``: smoothed inverse document frequency ``log((1 + D) / (1 + df_t)) + 1`` (sklearn's form),
- ``sif_weight``: the smooth-inverse-frequency weight ``a / (a + p(t))`` of Arora et al. (2017),
  ``a = 1e-3``; frequent function words get little weight, content words a lot,
- ``known``: ``df_t > 0`` and ``t`` not a special token. A sequence with no known token gives the
  router nothing to go on (see :func:`taskmoe.router.policy.input_fallback`).

Design choice: statistics are computed once from the router's training split with numpy
``bincount`` (no Python loop over tokens) and stored as plain tensors, so they save to
safetensors and load without the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from taskmoe.errors import DataError

SIF_A = 1e-3


@dataclass
class VocabStats:
    """Per-token corpus counts (``counts``, ``df`` of shape ``(V,)``) and the number of documents."""

    counts: np.ndarray
    df: np.ndarray
    n_docs: int
    special_ids: tuple[int, ...] = ()

    @classmethod
    def from_sequences(cls, seqs: Iterable[Sequence[int]], vocab_size: int, special_ids: Iterable[int] = ()) -> "VocabStats":
        counts = np.zeros(vocab_size, dtype=np.int64)
        df = np.zeros(vocab_size, dtype=np.int64)
        n = 0
        for s in seqs:
            a = np.asarray(s, dtype=np.int64)
            if a.size and (a.min() < 0 or a.max() >= vocab_size):
                raise DataError(f"token id out of range [0, {vocab_size}) in document {n}: {int(a.min())}..{int(a.max())}")
            counts += np.bincount(a, minlength=vocab_size)
            df[np.unique(a)] += 1
            n += 1
        if n == 0 or counts.sum() == 0:
            raise DataError("vocabulary statistics: the corpus has no tokens")
        return cls(counts=counts, df=df, n_docs=n, special_ids=tuple(int(i) for i in special_ids))

    @property
    def vocab_size(self) -> int:
        return int(self.counts.shape[0])

    @property
    def unigram_p(self) -> np.ndarray:
        return (self.counts + 1.0) / (self.counts.sum() + self.vocab_size)

    @property
    def idf(self) -> np.ndarray:
        return np.log((1.0 + self.n_docs) / (1.0 + self.df)) + 1.0

    @property
    def known(self) -> np.ndarray:
        k = self.df > 0
        if self.special_ids:
            k[list(self.special_ids)] = False
        return k

    def sif_weight(self, a: float = SIF_A) -> np.ndarray:
        """``a / (a + p_t)`` for known tokens, 0 for unknown and special tokens (``(V,)`` float32)."""
        p = self.counts / max(1, self.counts.sum())
        return np.where(self.known, a / (a + p), 0.0).astype(np.float32)

    # -------------------------------------------------------------------------- on disk
    def tensors(self, prefix: str = "vocab.") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}counts": torch.from_numpy(self.counts.astype(np.int64)),
            f"{prefix}df": torch.from_numpy(self.df.astype(np.int64)),
            f"{prefix}meta": torch.tensor([self.n_docs], dtype=torch.int64),
            f"{prefix}special_ids": torch.tensor(list(self.special_ids), dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str = "vocab.") -> "VocabStats":
        return cls(
            counts=t[f"{prefix}counts"].numpy().astype(np.int64),
            df=t[f"{prefix}df"].numpy().astype(np.int64),
            n_docs=int(t[f"{prefix}meta"][0]),
            special_ids=tuple(int(i) for i in t[f"{prefix}special_ids"].tolist()),
        )
