"""The seed's "RAG-style" expert loss: is what the expert predicts semantically close to what its
own training data says about the same thing?

For a training sequence x (one of the expert's training chunks):

1. **Retrieve.** Its k nearest training neighbours N(x) are looked up in a
   :class:`RetrievalIndex` over the expert's own training chunks, embedded with the router's
   encoder (pooled shared token embeddings). The sequence itself is excluded.
2. **Predict, differentiably.** The expert's next-token distributions p_t = softmax(logits_t)
   give an *expected embedding* per position, ``e_t = sum_v p_t(v) * w_v * E[v]`` (E the
   shared embedding table, w optional per-token pooling weights such as IDF), pooled over the
   sequence and L2-normalised: ``z(x) = normalize(mean_t e_t)``.
3. **Score.** ``L_sem = 1 - cos(z(x), normalize(mean_{n in N(x)} v_n))`` with v_n the
   neighbours' pooled encoder vectors. The gradient flows through p_t into the expert.

The expert's total loss is ``(1 - λ) * CE + λ * L_sem``; λ = 1 is the seed's pure form (no
next-token prediction at all), λ = 0 plain language modelling.

Nearest-neighbour search uses faiss (``faiss-cpu``, optional, HNSW over inner products of unit
vectors) when installed and the index is large, else an exact matrix product in torch; both
return the same neighbours up to HNSW's approximation (tested against the exact path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taskmoe.errors import ConfigError


def expected_embedding(
    logits: torch.Tensor,
    table: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pooled expected embedding ``normalize(mean_t sum_v softmax(logits_t)_v * w_v * E_v)``.

    logits: (B, T, V); table: (V, D); token_weights: (V,) or None; mask: (B, T) of 0/1 or None.
    Returns (B, D), unit length.
    """
    if logits.shape[-1] != table.shape[0]:
        raise ConfigError(f"logits have {logits.shape[-1]} classes but the embedding table has {table.shape[0]} rows")
    probs = logits.float().softmax(-1)  # (B, T, V)
    weighted = table.float() if token_weights is None else table.float() * token_weights.float()[:, None]  # (V, D)
    e = probs @ weighted  # (B, T, D)
    if mask is None:
        pooled = e.mean(1)
    else:
        m = mask.float()[..., None]  # (B, T, 1)
        pooled = (e * m).sum(1) / m.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def semantic_similarity_loss(pred: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """``mean_b (1 - cos(pred_b, normalize(mean_k neighbours_{b,k})))``.

    pred: (B, D) unit vectors; neighbours: (B, K, D). Returns a scalar in [0, 2].
    """
    target = F.normalize(neighbours.float().mean(1), dim=-1)  # (B, D)
    return (1.0 - (F.normalize(pred.float(), dim=-1) * target).sum(-1)).mean()


def combined_loss(ce: torch.Tensor, sem: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``(1 - λ) * CE + λ * L_sem``; with λ = 0 the semantic term is not needed (may be None)."""
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"semantic loss weight λ must be in [0, 1], got {lam}")
    if lam == 0.0:
        return ce
    if sem is None:
        raise ConfigError("λ > 0 needs the semantic-similarity term")
    return (1.0 - lam) * ce + lam * sem


def _faiss():
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    return faiss


@dataclass
class SearchResult:
    scores: torch.Tensor  # (B, K) cosine similarities, best first
    ids: torch.Tensor  # (B, K) row ids into the index


class RetrievalIndex:
    """k-nearest-neighbour search over unit vectors by cosine similarity.

    ``backend``: ``"exact"`` (torch matmul + topk), ``"faiss"`` (HNSW, needs faiss-cpu), or
    ``"auto"`` (faiss when importable and the index has at least ``ann_min_size`` rows).
    """

    def __init__(self, vectors: torch.Tensor, *, backend: str = "auto", ann_min_size: int = 50_000, hnsw_m: int = 32) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ConfigError(f"a retrieval index needs a non-empty (N, D) matrix, got shape {tuple(vectors.shape)}")
        if backend not in ("auto", "exact", "faiss"):
            raise ConfigError(f"backend must be auto | exact | faiss, got {backend!r}")
        self.vectors = F.normalize(vectors.detach().float(), dim=-1).contiguous()
        faiss = _faiss()
        if backend == "faiss" and faiss is None:
            raise ConfigError("backend='faiss' needs faiss-cpu: pip install 'taskmoe[ann]'")
        use_faiss = backend == "faiss" or (backend == "auto" and faiss is not None and len(self.vectors) >= ann_min_size)
        self.backend = "faiss" if use_faiss else "exact"
        self._faiss_index = None
        if use_faiss:
            idx = faiss.IndexHNSWFlat(self.vectors.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efSearch = max(64, 4 * hnsw_m)
            idx.add(self.vectors.numpy())
            self._faiss_index = idx

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None) -> SearchResult:
        """Top-k rows by cosine similarity for each query; ``exclude`` (B,) drops one id per query
        (the query's own row when it is in the index)."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        extra = 1 if exclude is not None else 0
        kk = min(k + extra, len(self))
        q = F.normalize(queries.detach().float(), dim=-1)
        if self._faiss_index is not None:
            s, i = self._faiss_index.search(q.numpy(), kk)
            scores, ids = torch.from_numpy(s), torch.from_numpy(i).long()
        else:
            scores, ids = (q @ self.vectors.T).topk(kk, dim=-1)
        if exclude is not None:
            # drop the excluded id where it was retrieved, else the (k+1)-th candidate
            masked = scores.masked_fill(ids == exclude[:, None], float("-inf"))
            scores, pos = masked.topk(min(k, kk), dim=-1)
            ids = ids.gather(1, pos)
        return SearchResult(scores=scores[:, :k], ids=ids[:, :k])

    def neighbours(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """The neighbours' vectors, (B, K, D)."""
        return self.vectors[self.search(queries, k, exclude=exclude).ids]
