"""The complexity scorer: logistic regression on cheap sequence features -> c_S in [0, 1].

``c_S`` lowers the selection threshold ``t_C`` (see :mod:`taskmoe.router.policy`): a complex
input is sent to more experts.

Features (:func:`features`, one row per token-id sequence; every one is computable at routing
time from the ids and per-token tables stored with the router):

====  ===========================================================================
 0    ``log(1 + n)``, the length in tokens
 1    type/token ratio ``|unique ids| / n`` (lexical variety)
 2    mean unigram surprisal ``mean_t -log p(x_t)`` (add-one smoothed corpus unigram)
 3    standard deviation of the unigram surprisal (a mix of very common and very rare tokens)
 4    mean IDF of the tokens (topical rarity)
 5    unknown-token rate: tokens never seen in the router's training corpus
 6    mean characters per token (short tokens = the BPE fell back towards bytes)
 7    byte-fallback rate: tokens that decode to a single character
 8    digit ratio: tokens made only of digits
 9    punctuation ratio: tokens made only of punctuation/symbols
====  ===========================================================================

Features 6-9 need the tokenizer's ``decode`` when the scorer is fitted (a ``(V, 3)`` table of
characters / digit / punctuation per token is stored); without it they are constant 0 and the
regression gives them no weight.

Default target (no labels needed): a sequence is **complex** (label 1) when its per-token
cross-entropy under an interpolated **bigram LM** trained on the rest of the corpus is above the
median *of its own category* (the discovered pseudo-labels; the global median if none are
given). Why: it is the seed's "harder than the median for a small LM trained on the corpus",
costs one pass of counting, and the per-category median removes the domain from the target (code
is not "complex" merely because it is code), so ``c_S`` ranks inputs within what an expert
sees. The bigram is **cross-fitted**: it is trained on one half of the documents and scores the
other half (and vice versa), so no document is scored by counts that include itself.
Bigram: ``p(b | a) = lam * c(a, b) / c(a) + (1 - lam) * p_uni(b)``, ``lam = 0.7`` (``p_uni`` add-one
smoothed; contexts never seen use ``p_uni`` alone).

User labels: ``fit(seqs, labels=...)`` with one 0/1 label per sequence replaces the default target.

The fitted model is stored as arrays (feature mean and scale, ``coef``, ``intercept``) and
applied as ``c_S = sigmoid(((f - mean) / scale) . coef + intercept)``, which equals sklearn's
``predict_proba[:, 1]`` (tested); no sklearn object is pickled.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from taskmoe.config import Config, check_min, check_range, doc
from taskmoe.errors import DataError
from taskmoe.router.vocab import VocabStats

FEATURES = (
    "log_len", "type_token_ratio", "mean_surprisal", "std_surprisal", "mean_idf",
    "unknown_rate", "chars_per_token", "byte_fallback_rate", "digit_ratio", "punct_ratio",
)
_PUNCT = set(string.punctuation) | set("“”‘’«»—–…")


@dataclass
class ComplexityConfig(Config):
    """The logistic-regression complexity scorer."""

    C: float = doc(1.0, "inverse L2 regularisation strength of the logistic regression")
    bigram_lambda: float = doc(0.7, "interpolation weight of the bigram in the default target's LM")
    max_iter: int = doc(1000, "logistic-regression solver iterations")

    def validate(self) -> None:
        check_min(self, ("C",), strict=True, owner="complexity")
        check_range(self, ("bigram_lambda",), open_high=True, owner="complexity")
        check_min(self, ("max_iter",), 1, owner="complexity")


def token_table(decode: Callable[[Sequence[int]], str], vocab_size: int) -> np.ndarray:
    """Per-token ``[characters, is_digits, is_punctuation]``, shape ``(V, 3)`` float32."""
    tab = np.zeros((vocab_size, 3), dtype=np.float32)
    for i in range(vocab_size):
        s = decode([i])
        st = s.strip()
        tab[i, 0] = len(s)
        tab[i, 1] = float(bool(st) and st.isdigit())
        tab[i, 2] = float(bool(st) and all(ch in _PUNCT for ch in st))
    return tab


def features(seqs: Sequence[Sequence[int]], stats: VocabStats, table: np.ndarray) -> np.ndarray:
    """The feature matrix ``(N, len(FEATURES))`` (see the module docstring). Empty rows are all 0."""
    surprisal = -np.log(stats.unigram_p)  # (V,)
    idf, known = stats.idf, stats.known
    out = np.zeros((len(seqs), len(FEATURES)), dtype=np.float64)
    for r, s in enumerate(seqs):
        a = np.asarray(s, dtype=np.int64)
        n = a.size
        if n == 0:
            continue
        if a.min() < 0 or a.max() >= stats.vocab_size:
            raise DataError(f"complexity: token id out of range [0, {stats.vocab_size}) in sequence {r}")
        sp = surprisal[a]
        t = table[a]  # (n, 3)
        out[r] = (
            np.log1p(n), np.unique(a).size / n, sp.mean(), sp.std(), idf[a].mean(),
            1.0 - known[a].mean(), t[:, 0].mean(), (t[:, 0] == 1).mean(), t[:, 1].mean(), t[:, 2].mean(),
        )
    return out


class BigramLM:
    """Interpolated bigram LM over token ids, counted with numpy (pair codes ``a * V + b``)."""

    def __init__(self, seqs: Sequence[Sequence[int]], vocab_size: int, lam: float) -> None:
        self.V, self.lam = vocab_size, lam
        uni = np.zeros(vocab_size, dtype=np.int64)
        ctx = np.zeros(vocab_size, dtype=np.int64)
        codes = []
        for s in seqs:
            a = np.asarray(s, dtype=np.int64)
            uni += np.bincount(a, minlength=vocab_size)
            if a.size > 1:
                ctx += np.bincount(a[:-1], minlength=vocab_size)
                codes.append(a[:-1] * vocab_size + a[1:])
        self.p_uni = (uni + 1.0) / (uni.sum() + vocab_size)
        self.ctx = ctx
        allc = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int64)
        self.codes, self.pair_counts = np.unique(allc, return_counts=True)

    def nll(self, seq: Sequence[int]) -> float:
        """Mean per-token ``-log p``: the first token under the unigram, the rest under the bigram."""
        a = np.asarray(seq, dtype=np.int64)
        if a.size == 0:
            return 0.0
        lp = [np.log(self.p_uni[a[0]])]
        if a.size > 1:
            prev, nxt = a[:-1], a[1:]
            code = prev * self.V + nxt
            c_ab = np.zeros(code.size, dtype=np.int64)
            if self.codes.size:
                pos = np.minimum(np.searchsorted(self.codes, code), self.codes.size - 1)
                hit = self.codes[pos] == code
                c_ab[hit] = self.pair_counts[pos[hit]]
            c_a = self.ctx[prev]
            p_bi = np.divide(c_ab, c_a, out=np.zeros(c_ab.shape, dtype=np.float64), where=c_a > 0)
            lam = np.where(c_a > 0, self.lam, 0.0)
            lp.extend(np.log(lam * p_bi + (1 - lam) * self.p_uni[nxt]).tolist())
        return float(-np.mean(lp))


def default_target(
    seqs: Sequence[Sequence[int]], vocab_size: int, groups: np.ndarray | None, lam: float, folds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted bigram loss per sequence and the label ``loss > median of its group``.

    ``folds`` (0/1 per sequence, default alternating) says which half a sequence belongs to; the
    bigram of the other half scores it. Returns ``(labels (N,) int, losses (N,) float)``.
    """
    n = len(seqs)
    idx = np.arange(n)
    fold_of = idx % 2 if folds is None else np.asarray(folds)
    losses = np.zeros(n)
    for fold in (0, 1):
        fit_idx, score_idx = idx[fold_of != fold], idx[fold_of == fold]
        lm = BigramLM([seqs[i] for i in fit_idx], vocab_size, lam)
        for i in score_idx:
            losses[i] = lm.nll(seqs[i])
    g = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    labels = np.zeros(n, dtype=np.int64)
    for gv in np.unique(g):
        m = g == gv
        labels[m] = (losses[m] > np.median(losses[m])).astype(np.int64)
    return labels, losses


class ComplexityScorer:
    """``c_S = sigmoid(((f - mean) / scale) . coef + intercept)`` on :func:`features`."""

    def __init__(self, stats: VocabStats, table: np.ndarray, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float) -> None:
        self.stats, self.table = stats, table
        self.mean, self.scale, self.coef, self.intercept = mean, scale, coef, float(intercept)

    @classmethod
    def fit(
        cls, seqs: Sequence[Sequence[int]], stats: VocabStats, cfg: ComplexityConfig, *,
        labels: Sequence[int] | np.ndarray | None = None, groups: np.ndarray | None = None,
        folds: np.ndarray | None = None, table: np.ndarray | None = None,
    ) -> tuple["ComplexityScorer", dict[str, Any]]:
        """Fit on ``seqs`` with user ``labels`` (0/1) or the default bigram target (see module docstring)."""
        from sklearn.linear_model import LogisticRegression

        seqs = [s for s in seqs]
        if table is None:
            table = np.zeros((stats.vocab_size, 3), dtype=np.float32)
        info: dict[str, Any] = {}
        if labels is None:
            y, losses = default_target(seqs, stats.vocab_size, groups, cfg.bigram_lambda, folds)
            info["target"] = "bigram loss above the per-category median (cross-fitted)"
            info["bigram_loss_median"] = float(np.median(losses))
        else:
            y = np.asarray(labels)
            if y.shape != (len(seqs),):
                raise DataError(f"complexity labels: expected {len(seqs)} labels, got shape {y.shape}")
            if not np.isin(y, (0, 1)).all():
                raise DataError(f"complexity labels must be 0 or 1, got values {sorted(set(np.unique(y).tolist()))[:5]}")
            y = y.astype(np.int64)
            info["target"] = "user labels"
        keep = np.array([len(s) > 0 for s in seqs])
        f, y = features([s for s, k in zip(seqs, keep) if k], stats, table), y[keep]
        if len(np.unique(y)) < 2:
            raise DataError("complexity: the target has a single class; need both simple (0) and complex (1) examples")
        mean = f.mean(0)
        scale = f.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        lr = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit((f - mean) / scale, y)
        scorer = cls(stats, table, mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))
        info["train_acc"] = float(lr.score((f - mean) / scale, y))
        info["coef"] = {name: round(float(c), 4) for name, c in zip(FEATURES, lr.coef_[0])}
        scorer._sk = lr  # in memory only, for the twin test
        return scorer, info

    def score_features(self, f: np.ndarray) -> np.ndarray:
        z = ((f - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def score(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """``c_S`` for each sequence, ``(N,)`` in [0, 1]."""
        return self.score_features(features(seqs, self.stats, self.table))

    # --------------------------------------------------------------------------- on disk
    def tensors(self) -> dict[str, torch.Tensor]:
        t = {
            "complexity.table": torch.from_numpy(self.table.astype(np.float32)),
            "complexity.mean": torch.from_numpy(self.mean.astype(np.float64)),
            "complexity.scale": torch.from_numpy(self.scale.astype(np.float64)),
            "complexity.coef": torch.from_numpy(self.coef.astype(np.float64)),
            "complexity.intercept": torch.tensor([self.intercept], dtype=torch.float64),
        }
        t.update(self.stats.tensors("complexity.vocab."))
        return t

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "ComplexityScorer":
        return cls(
            VocabStats.from_tensors(t, "complexity.vocab."), t["complexity.table"].numpy(),
            t["complexity.mean"].numpy(), t["complexity.scale"].numpy(), t["complexity.coef"].numpy(),
            float(t["complexity.intercept"][0]),
        )
