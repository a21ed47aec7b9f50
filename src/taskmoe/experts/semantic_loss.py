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

Training data: :class:`RetrievalWindows` holds an expert's LM windows and, for each, the ids of
its k nearest *other* training windows (found once: the encoder is frozen, so neighbours never
change), and collates ``input_ids``, ``targets`` and the neighbours' vectors ``(B, K, D)``;
held-out windows query the same training index. :func:`encode_windows` embeds windows with any
``encode(ids) -> vectors`` (the router's).

Nearest-neighbour search uses faiss (``faiss-cpu``, optional, HNSW over inner products of unit
vectors) when installed and the index is large, else an exact matrix product in torch; both
return the same neighbours up to HNSW's approximation (tested against the exact path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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


# ------------------------------------------------------------------ training windows + neighbours
def encode_windows(encode: Any, windows: Sequence[torch.Tensor], batch: int = 1024) -> torch.Tensor:
    """``encode(list of id lists) -> (n, D)`` over every window, in batches; returns (N, D) float32."""
    out = []
    for s in range(0, len(windows), batch):
        ids = [w.tolist() for w in windows[s : s + batch]]
        out.append(torch.as_tensor(encode(ids), dtype=torch.float32))
    return torch.cat(out) if out else torch.zeros(0, 0)


class RetrievalWindows(torch.utils.data.Dataset):
    """LM windows, each with the encoder vectors of its ``k`` nearest windows in ``index``.

    ``windows[i]`` is a ``(T + 1,)`` id tensor (inputs ``w[:-1]``, targets ``w[1:]``, as
    :class:`taskmoe.data.PackedLMDataset` gives them). Neighbour ids are found once, here
    (the encoder is frozen, so they never change): with ``exclude_self`` the query window ``i``
    is row ``i`` of the index and is left out of its own neighbours (the training set); without
    it the windows are held-out queries against the training index. ``collate`` returns
    ``input_ids (B, T)``, ``targets (B, T)``, ``neighbours (B, K, D)`` and ``rows (B,)`` (the
    windows' indices, for per-window side data such as routing weights).
    """

    def __init__(self, windows: Sequence[torch.Tensor], vectors: torch.Tensor, index: RetrievalIndex, k: int, *,
                 exclude_self: bool) -> None:
        if len(windows) != len(vectors):
            raise ConfigError(f"{len(windows)} windows but {len(vectors)} vectors")
        if exclude_self and len(index) != len(windows):
            raise ConfigError("exclude_self needs the windows to be the index rows (same count)")
        if len(index) < 1 + int(exclude_self):
            raise ConfigError(f"the retrieval index has {len(index)} rows: too few to retrieve neighbours")
        self.windows = windows
        self.index = index
        self.k = min(k, len(index) - int(exclude_self))
        exclude = torch.arange(len(windows)) if exclude_self else None
        ids = []
        for s in range(0, len(windows), 4096):  # bounded memory for the (n, N) similarity block
            ex = exclude[s : s + 4096] if exclude is not None else None
            ids.append(index.search(vectors[s : s + 4096], self.k, exclude=ex).ids)
        self.neighbour_ids = torch.cat(ids) if ids else torch.zeros(0, self.k, dtype=torch.long)  # (N, K)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.windows[i], i

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        w = torch.stack([x for x, _ in items]).long()  # (B, T + 1)
        rows = torch.tensor([i for _, i in items])
        return {"input_ids": w[:, :-1], "targets": w[:, 1:],
                "neighbours": self.index.vectors[self.neighbour_ids[rows]], "rows": rows}  # (B, K, D), (B,)
