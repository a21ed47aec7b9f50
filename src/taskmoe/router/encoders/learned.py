"""The learned encoder (``kind = "learned"``, the IMoE seed's default): a token embedding table
``nn.Embedding(vocab_size, d_model)`` learned **from scratch** on the corpus, pooled into a sequence
vector. This table is *the* table every expert and the summarizer share (``router.embedding``),
stored once in the router folder.

Objective and why
-----------------
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
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskmoe.config import Config, check, doc
from taskmoe.errors import ConfigError, DataError
from taskmoe.router.encoders.base import NotFittedError, Seqs, Trainer, flatten
from taskmoe.router.vocab import VocabStats

__all__ = ["LearnedEncoderConfig", "bag_of_words_nll", "info_nce", "SpanPairs", "LearnedEncoder"]


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
        a_ids, a_off = flatten([a for a, _ in items])
        b_ids, b_off = flatten([b for _, b in items])
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
            ids, off = flatten([self._check_ids(x) for x in chunk])
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
