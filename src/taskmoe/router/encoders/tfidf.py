"""The tf-idf encoder (``kind = "tfidf"``): TF-IDF over token ids + truncated SVD, L2-normalised;
the c-BTM router and our baseline. Fitting needs at least two non-empty documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import numpy as np
import torch

from taskmoe.config import Config, check, doc
from taskmoe.errors import DataError
from taskmoe.router.encoders.base import NotFittedError, Seqs, Trainer, normalize_rows

__all__ = ["TfidfEncoderConfig", "TfidfEncoder"]


@dataclass
class TfidfEncoderConfig(Config):
    """TF-IDF + truncated SVD (the c-BTM router)."""

    dim: int = doc(128, "SVD components (vector width D)")
    min_df: int = doc(2, "ignore tokens in fewer documents than this")
    sublinear_tf: bool = doc(True, "use 1 + log(tf) instead of raw counts")
    seed: int = doc(0, "SVD random state")

    def validate(self) -> None:
        check(self.dim > 0, f"tfidf.dim must be > 0, got {self.dim}")
        check(self.min_df >= 1, f"tfidf.min_df must be >= 1, got {self.min_df}")


class TfidfEncoder:
    """TF-IDF over token ids, projected by truncated SVD, L2-normalised.

    Fitting uses scikit-learn (``TfidfVectorizer`` on id lists, ``TruncatedSVD``); transforming
    uses the stored arrays (column of each token id, ``idf``, SVD ``components``) with scipy
    sparse products, so nothing is pickled and the result equals sklearn's pipeline (tested):
    ``z = normalize(normalize(tf(x) * idf) @ components.T)`` with ``tf = 1 + log(count)``.
    """

    kind: ClassVar[str] = "tfidf"

    def __init__(self, cfg: TfidfEncoderConfig) -> None:
        self.cfg = cfg
        self.column: np.ndarray | None = None  # (V,) column of each token id, -1 if not kept
        self.idf: np.ndarray | None = None  # (F,)
        self.components: np.ndarray | None = None  # (D, F)

    @property
    def dim(self) -> int:
        return self.cfg.dim if self.components is None else int(self.components.shape[0])

    @property
    def fitted(self) -> bool:
        return self.components is not None

    def fit(self, seqs: Seqs, *, trainer: Trainer | None = None, special_ids: Iterable[int] = ()) -> "TfidfEncoder":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        special = set(int(i) for i in special_ids)
        docs = [[int(t) for t in s if int(t) not in special] for s in seqs]
        if sum(1 for d in docs if d) < 2:
            raise DataError(f"tfidf encoder: need >= 2 non-empty documents, got {sum(1 for d in docs if d)}")
        vec = TfidfVectorizer(analyzer=lambda d: d, min_df=self.cfg.min_df, sublinear_tf=self.cfg.sublinear_tf, dtype=np.float64)
        try:
            x = vec.fit_transform(docs)
        except ValueError as e:  # e.g. min_df leaves no token
            raise DataError(f"tfidf encoder: {e}") from e
        n_comp = min(self.cfg.dim, x.shape[1] - 1, x.shape[0] - 1)
        if n_comp < 1:
            raise DataError(f"tfidf encoder: too few documents/tokens for an SVD ({x.shape})")
        svd = TruncatedSVD(n_components=n_comp, random_state=self.cfg.seed).fit(x)
        vocab_size = max(max((max(d) for d in docs if d), default=0) + 1, max(vec.vocabulary_) + 1)
        column = np.full(vocab_size, -1, dtype=np.int64)
        for tok, col in vec.vocabulary_.items():
            column[int(tok)] = col
        self.column, self.idf, self.components = column, vec.idf_.astype(np.float64), svd.components_.astype(np.float64)
        self._sk = (vec, svd)  # kept in memory only, for the twin test
        return self

    def _tfidf(self, seqs: Seqs):  # -> scipy.sparse.csr_matrix (N, F)
        import scipy.sparse as sp

        if not self.fitted:
            raise NotFittedError("tfidf encoder is not fitted: call fit() or load a router folder")
        assert self.column is not None and self.idf is not None
        rows, cols = [], []
        for r, s in enumerate(seqs):
            a = np.asarray(s, dtype=np.int64)
            if a.size and (a.min() < 0):
                raise DataError(f"negative token id in sequence {r}")
            a = a[a < len(self.column)]
            c = self.column[a]
            c = c[c >= 0]
            rows.append(np.full(c.size, r, dtype=np.int64))
            cols.append(c)
        r_all = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        c_all = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        x = sp.csr_matrix((np.ones(r_all.size), (r_all, c_all)), shape=(len(seqs), self.idf.size))
        x.sum_duplicates()
        if self.cfg.sublinear_tf:
            x.data = 1.0 + np.log(x.data)
        x = x.multiply(self.idf[None, :]).tocsr()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())  # (N,)
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return sp.diags(inv) @ x

    def encode(self, seqs: Seqs) -> np.ndarray:
        x = self._tfidf(seqs)
        assert self.components is not None
        return normalize_rows(np.asarray(x @ self.components.T))

    def readable(self, seqs: Seqs) -> np.ndarray:
        return np.asarray(self._tfidf(seqs).getnnz(axis=1) > 0)

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def tensors(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise NotFittedError("tfidf encoder is not fitted: nothing to save")
        return {
            "column": torch.from_numpy(self.column),
            "idf": torch.from_numpy(self.idf),
            "components": torch.from_numpy(self.components),
        }

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **_: Any) -> "TfidfEncoder":
        enc = cls(TfidfEncoderConfig.from_dict(config, source="router encoder config"))
        enc.column = tensors["column"].numpy().astype(np.int64)
        enc.idf = tensors["idf"].numpy().astype(np.float64)
        enc.components = tensors["components"].numpy().astype(np.float64)
        return enc
