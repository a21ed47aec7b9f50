"""Fitting a router end to end: encoder -> categories -> classifier -> complexity -> :class:`Router`.

:func:`fit_router` is the whole recipe minus the training loop, which is injected as a
``trainer`` (the learned encoder's contrastive training runs on the shared loop; the training
recipe :mod:`taskmoe.training.recipes.router` builds that trainer, loads the corpus and the
tokenizer, and saves the folder). Stages, in order:

1. fit the encoder on the training sequences (``learned``: SIF weights + contrastive training;
   ``tfidf``: TF-IDF + SVD; ``pretrained``: nothing to fit);
2. encode train and validation; sequences the encoder cannot read are left out;
3. discover ``n_categories`` (or ``auto``) with balanced spherical k-means on train vectors;
4. label validation vectors by their nearest centroid; train the classifier head on the train
   pseudo-labels and fit its temperature on validation (ECE before/after in the report);
   ``crops`` random crops per document (log-uniform lengths, labelled like their document) join
   both sets, so short prompts, which is what a router sees at inference, are in-distribution;
5. fit the complexity scorer on documents + crops (default target: bigram loss above the
   per-category median), so length is a learned feature rather than an extrapolation;
6. keep a replay sample per category for later :meth:`Router.add_category`.

Category names are ``c0 .. c{K-1}``; each gets a description made of its most characteristic
word-initial tokens (highest lift ``p(t | category) / p(t)`` among tokens seen at least 20 times
there).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from taskmoe.config import Config, check, doc
from taskmoe.errors import DataError
from taskmoe.router.encoders.backbone import BackboneEncoderConfig
from taskmoe.router.classifier import ClassifierConfig, fit_head
from taskmoe.router.clustering import ClusteringConfig, assign_nearest, discover, scores_table
from taskmoe.router.complexity import ComplexityConfig, ComplexityScorer, token_table
from taskmoe.router.encoders import (
    LearnedEncoderConfig,
    PretrainedEncoderConfig,
    TfidfEncoderConfig,
    Trainer,
    build_encoder,
)
from taskmoe.router.policy import PolicyConfig
from taskmoe.router.router import Replay, Router
from taskmoe.router.vocab import VocabStats

ENCODER_KINDS = ("learned", "tfidf", "pretrained", "backbone")


@dataclass
class RouterConfig(Config):
    """Everything :func:`fit_router` needs; one sub-config per part."""

    encoder: str = doc("learned", "encoder kind: 'learned' (default, shared embedding table), 'tfidf' (c-BTM baseline), 'pretrained' or 'backbone' (the backbone's hidden states)")
    learned: LearnedEncoderConfig = doc(LearnedEncoderConfig(), "the learned encoder")
    tfidf: TfidfEncoderConfig = doc(TfidfEncoderConfig(), "the tf-idf encoder")
    pretrained: PretrainedEncoderConfig = doc(PretrainedEncoderConfig(), "the pretrained encoder")
    backbone: BackboneEncoderConfig = doc(BackboneEncoderConfig(), "the backbone encoder (hidden states of the backbone)")
    clustering: ClusteringConfig = doc(ClusteringConfig(), "category discovery")
    classifier: ClassifierConfig = doc(ClassifierConfig(), "the classifier head")
    complexity: ComplexityConfig = doc(ComplexityConfig(), "the complexity scorer")
    policy: PolicyConfig = doc(PolicyConfig(), "the routing policy")
    crops: int = doc(1, "random crops per document added to classifier/complexity training, so short prompts are in-distribution")
    crop_min: int = doc(8, "shortest crop (tokens); crop lengths are log-uniform in [crop_min, document length]")
    seed: int = doc(0, "seed of the crops")

    def validate(self) -> None:
        check(self.encoder in ENCODER_KINDS, f"router.encoder must be one of {ENCODER_KINDS}, got {self.encoder!r}")
        check(self.crops >= 0, f"router.crops must be >= 0, got {self.crops}")
        check(self.crop_min >= 1, f"router.crop_min must be >= 1, got {self.crop_min}")


def random_crops(seqs: Sequence[Sequence[int]], per_doc: int, min_len: int, seed: int) -> tuple[list[list[int]], np.ndarray]:
    """``per_doc`` random contiguous crops of each sequence longer than ``min_len``.

    Crop length ``L = round(exp(U[log min_len, log n]))`` (log-uniform: as many short prompts
    as long passages), start uniform. Returns the crops and the index of each crop's source.
    """
    rng = np.random.default_rng([seed, 104729])
    crops: list[list[int]] = []
    src: list[int] = []
    for i, s in enumerate(seqs):
        n = len(s)
        if n <= min_len:
            continue
        for _ in range(per_doc):
            length = int(round(np.exp(rng.uniform(np.log(min_len), np.log(n)))))
            start = int(rng.integers(0, n - length + 1))
            crops.append(list(s[start : start + length]))
            src.append(i)
    return crops, np.asarray(src, dtype=np.int64)


def _with_crops(encoder: Any, seqs: list[list[int]], labels: np.ndarray, cfg: "RouterConfig", salt: int) -> tuple[list[list[int]], np.ndarray, np.ndarray, np.ndarray]:
    """``seqs`` plus their readable crops, labelled like their source: (seqs, x, labels, source index)."""
    crops, src = random_crops(seqs, cfg.crops, cfg.crop_min, cfg.seed + salt)
    if crops:
        ok = encoder.readable(crops)
        crops, src = [c for c, o in zip(crops, ok) if o], src[ok]
    all_seqs = seqs + crops
    x = encoder.encode(all_seqs) if all_seqs else np.zeros((0, encoder.dim), np.float32)
    return all_seqs, x, np.concatenate([labels, labels[src]]).astype(np.int64), np.concatenate([np.arange(len(seqs)), src])


def describe_categories(
    seqs: Sequence[Sequence[int]], labels: np.ndarray, vocab_size: int, decode: Callable[[Sequence[int]], str] | None,
    special_ids: Sequence[int] = (), top: int = 6, min_count: int = 20,
) -> list[str]:
    """Most characteristic tokens per category by lift ``p(t | k) / p(t)`` (``""`` without ``decode``)."""
    k = int(labels.max()) + 1 if len(labels) else 0
    if decode is None:
        return [""] * k
    counts = np.zeros((k, vocab_size))
    for s, c in zip(seqs, labels):
        counts[c] += np.bincount(np.asarray(s, dtype=np.int64), minlength=vocab_size)
    counts[:, list(special_ids)] = 0
    p_all = counts.sum(0) / max(1.0, counts.sum())
    out = []
    for c in range(k):
        p_c = counts[c] / max(1.0, counts[c].sum())
        lift = np.where((counts[c] >= min_count) & (p_all > 0), p_c / np.maximum(p_all, 1e-30), 0.0)
        words: list[str] = []
        for t in np.argsort(-lift, kind="stable"):
            if lift[t] <= 0 or len(words) >= top:
                break
            raw = decode([int(t)])
            w = raw.strip()
            # whole words read better than sub-word pieces: keep word-initial tokens (leading space)
            if raw[:1].isspace() and len(w) >= 2 and w not in words:
                words.append(w)
        out.append(" ".join(words))
    return out


def fit_router(
    train: Sequence[Sequence[int]],
    validation: Sequence[Sequence[int]],
    cfg: RouterConfig,
    *,
    trainer: Trainer | None = None,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    complexity_labels: Sequence[int] | None = None,
    backbone: Any = None,
    log: Callable[[str], None] = lambda s: None,
) -> Router:
    """Fit every part of a router on token-id sequences (see the module docstring).

    ``tokenizer`` (optional) supplies special ids, ``decode`` (pretrained encoder, descriptions,
    per-token complexity features) and is stored with the router. ``vocab_size`` defaults to the
    tokenizer's, else the learned encoder's. ``complexity_labels`` (0/1 per train sequence)
    replace the default complexity target. ``backbone`` (a loaded backbone model) is shared with
    the ``backbone`` encoder instead of loading ``cfg.backbone.path``. The fit report is ``router.report``.
    """
    t0 = time.perf_counter()
    train = [list(map(int, s)) for s in train]
    validation = [list(map(int, s)) for s in validation]
    if len(train) < 2:
        raise DataError(f"fit_router: need at least 2 training sequences, got {len(train)}")
    decode = tokenizer.decode if tokenizer is not None else None
    special = sorted(tokenizer.special_ids.values()) if tokenizer is not None else []
    V = vocab_size or (tokenizer.vocab_size if tokenizer is not None else cfg.learned.vocab_size)
    learned_cfg = cfg.learned.replace(vocab_size=V) if cfg.learned.vocab_size != V else cfg.learned
    enc_cfg = {"learned": learned_cfg, "tfidf": cfg.tfidf, "pretrained": cfg.pretrained, "backbone": cfg.backbone}[cfg.encoder]
    report: dict[str, Any] = {"encoder": cfg.encoder, "train_docs": len(train), "validation_docs": len(validation)}

    log(f"[1/5] fitting the {cfg.encoder} encoder on {len(train)} sequences")
    encoder = build_encoder(cfg.encoder, enc_cfg, decode=decode)
    if backbone is not None and hasattr(encoder, "attach"):
        encoder.attach(backbone)  # the backbone encoder reads this already loaded model
    encoder.fit(train, trainer=trainer, special_ids=special)
    ok = encoder.readable(train)
    tr = [s for s, o in zip(train, ok) if o]
    report["train_unreadable"] = int((~ok).sum())
    x = encoder.encode(tr)
    ok_v = encoder.readable(validation) if validation else np.zeros(0, dtype=bool)
    va = [s for s, o in zip(validation, ok_v) if o]
    xv = encoder.encode(va) if va else np.zeros((0, x.shape[1]), dtype=np.float32)
    report["t_encoder_s"] = round(time.perf_counter() - t0, 2)

    log(f"[2/5] discovering categories (n_categories={cfg.clustering.n_categories})")
    res = discover(x, cfg.clustering)
    K = res.k
    if res.scores:
        report["silhouette"] = scores_table(res.scores)
        log("      silhouette by n_categories: " + ", ".join(f"{k}: {v:.4f}" for k, v in sorted(res.scores.items())))
    report["n_categories"] = K
    report["cluster_sizes"] = np.bincount(res.labels, minlength=K).tolist()
    report["kmeans_objective"] = round(res.objective / max(1, len(x)), 4)

    yv = assign_nearest(xv, res.centroids) if len(xv) else np.zeros(0, dtype=np.int64)
    tr_all, x_all, y_all, src_all = _with_crops(encoder, tr, res.labels, cfg, 0)
    _, xv_all, yv_all, _ = _with_crops(encoder, va, yv, cfg, 1)
    log(f"[3/5] training the classifier head on {len(x_all)} pseudo-labelled vectors ({len(x_all) - len(x)} crops)")
    head, cmetrics = fit_head(x_all, y_all, K, cfg.classifier, xv_all, yv_all)
    report["classifier"] = {k: round(v, 4) for k, v in cmetrics.items()}

    log("[4/5] fitting the complexity scorer")
    stats = VocabStats.from_sequences(train, V, special)
    table = token_table(decode, V) if decode is not None else None
    if complexity_labels is not None:
        if len(complexity_labels) != len(train):
            raise DataError(f"complexity_labels: expected {len(train)} labels (one per training sequence), got {len(complexity_labels)}")
        scorer, cinfo = ComplexityScorer.fit(tr, stats, cfg.complexity, labels=np.asarray(complexity_labels)[ok], table=table)
    else:
        # cross-fitting folds follow the source document, so a crop is never scored by counts of its own text
        scorer, cinfo = ComplexityScorer.fit(tr_all, stats, cfg.complexity, groups=y_all, folds=src_all % 2, table=table)
    report["complexity"] = cinfo

    log("[5/5] assembling the router")
    replay = Replay.sample(x_all, y_all, cfg.classifier.replay_per_category, cfg.classifier.seed)
    names = [f"c{i}" for i in range(K)]
    descriptions = describe_categories(tr, res.labels, V, decode, special)
    report["t_total_s"] = round(time.perf_counter() - t0, 2)
    return Router(
        encoder, head, res.centroids, scorer, cfg.policy, names, classifier_cfg=cfg.classifier, replay=replay,
        descriptions=descriptions, tokenizer=tokenizer, report=report,
    )
