"""The :class:`Router`: token ids -> :class:`~taskmoe.router.policy.RoutingDecision`, batched.

A router is composed from parts built elsewhere and injected (no god object):

- an :class:`~taskmoe.router.encoders.Encoder` (ids -> unit vectors),
- a :class:`~taskmoe.router.classifier.CategoryHead` (vectors -> calibrated confidences),
- the k-means ``centroids`` ``(K, D)`` of the discovered categories (kept for reports and for
  placing a new category),
- a :class:`~taskmoe.router.complexity.ComplexityScorer` (ids -> c_S),
- a :class:`~taskmoe.router.policy.PolicyConfig` (t_C_base, k, t_CT),
- a :class:`Replay` sample of training vectors with their categories, used when a category is
  added later (:meth:`Router.add_category`).

Inputs it cannot read are never a crash (documented fallback, see
:func:`~taskmoe.router.policy.input_fallback`): an empty sequence gives ``reason="empty input"``
and a sequence with no token the encoder knows gives ``reason="no known tokens"``; both send the
input to every expert. Token ids outside the vocabulary raise :class:`~taskmoe.errors.DataError`.
A router whose encoder is not fitted raises :class:`~taskmoe.router.encoders.NotFittedError`.

On disk: :meth:`Router.save` / :meth:`Router.load` call :mod:`taskmoe.router.persist`, which
holds the folder layout, and :func:`~taskmoe.router.persist.load_shared_embedding` (still
importable from here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from taskmoe.errors import ConfigError, DataError
from taskmoe.router.classifier import CategoryHead, ClassifierConfig, add_class
from taskmoe.router.complexity import ComplexityScorer
from taskmoe.router.encoders import Encoder, LearnedEncoder, NotFittedError
from taskmoe.router.availability import restrict, without
from taskmoe.router.policy import PolicyConfig, RoutingDecision, decide_batch, input_fallback

KIND = "router"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Replay:
    """Training vectors ``x (R, D)`` with their category ``labels (R,)``, kept for class addition."""

    x: np.ndarray
    labels: np.ndarray

    @classmethod
    def sample(cls, x: np.ndarray, labels: np.ndarray, per_category: int, seed: int = 0) -> "Replay":
        """Up to ``per_category`` rows of each category, chosen at random (seeded)."""
        rng = np.random.default_rng(seed)
        keep = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            keep.append(rng.permutation(idx)[:per_category])
        k = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
        return cls(np.asarray(x[k], dtype=np.float32), np.asarray(labels[k], dtype=np.int64))

    def extend(self, x: np.ndarray, label: int, per_category: int, seed: int = 0) -> "Replay":
        new = Replay.sample(x, np.full(len(x), label), per_category, seed)
        return Replay(np.concatenate([self.x, new.x]), np.concatenate([self.labels, new.labels]))


def _is_single(ids: Any) -> bool:
    """True for one sequence of ints (or an empty sequence), False for a list of sequences."""
    if isinstance(ids, torch.Tensor):
        return ids.dim() <= 1
    if isinstance(ids, np.ndarray):
        return ids.ndim <= 1
    if len(ids) == 0:
        return True
    return isinstance(ids[0], (int, np.integer))


def _as_lists(seqs: Any) -> list[list[int]]:
    out = []
    for n, s in enumerate(seqs):
        if isinstance(s, torch.Tensor):
            s = s.tolist()
        elif isinstance(s, np.ndarray):
            s = s.tolist()
        if isinstance(s, str):
            raise DataError(f"route: input {n} is text; pass token ids or use route_text with a tokenizer")
        try:
            out.append([int(t) for t in s])
        except (TypeError, ValueError) as e:
            raise DataError(f"route: input {n} is not a sequence of token ids ({e})") from e
    return out


class Router:
    """Routes token-id sequences to categories (experts). See the module docstring."""

    def __init__(
        self,
        encoder: Encoder,
        head: CategoryHead,
        centroids: np.ndarray,
        complexity: ComplexityScorer,
        policy: PolicyConfig,
        categories: Sequence[str],
        *,
        classifier_cfg: ClassifierConfig | None = None,
        replay: Replay | None = None,
        descriptions: Sequence[str] | None = None,
        tokenizer: Any = None,
        report: dict[str, Any] | None = None,
    ) -> None:
        k = len(categories)
        if k < 1:
            raise ConfigError("router: needs at least one category")
        if len(set(categories)) != k:
            raise ConfigError(f"router: category names must be unique, got {list(categories)}")
        if centroids.shape[0] != k:
            raise ConfigError(f"router: {centroids.shape[0]} centroids for {k} categories")
        self.encoder = encoder
        self.head = head.eval()
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self.complexity = complexity
        self.policy = policy
        self.categories = list(categories)
        self.classifier_cfg = classifier_cfg or ClassifierConfig()
        self.replay = replay
        self.descriptions = list(descriptions) if descriptions is not None else [""] * k
        self.tokenizer = tokenizer
        self.report = dict(report or {})
        # categories without an expert (pruned in training): routed around (router/availability.py)
        self.unavailable: frozenset[int] = frozenset()

    # ------------------------------------------------------------------------- properties
    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def embedding(self) -> nn.Embedding | None:
        """The shared token embedding table (``learned`` encoder), else None."""
        return self.encoder.embedding if isinstance(self.encoder, LearnedEncoder) else None

    # ---------------------------------------------------------------------------- routing
    def _check_fitted(self) -> None:
        if not self.encoder.fitted:
            raise NotFittedError("router is not fitted: run `taskmoe route fit` (or fit_router) or Router.load(folder)")

    def confidences(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Calibrated confidences ``(N, K)``; unreadable rows get the uniform ``1/K``."""
        self._check_fitted()
        seqs = _as_lists(seqs)
        out = np.full((len(seqs), self.n_categories), 1.0 / self.n_categories)
        ok = self.encoder.readable(seqs)
        if ok.any():
            out[ok] = self.head.probs(self.encoder.encode([s for s, o in zip(seqs, ok) if o]))
        return restrict(out, self.unavailable)

    def route(self, ids: Any) -> RoutingDecision | list[RoutingDecision]:
        """Route one sequence of token ids (-> a decision) or a batch of them (-> a list).

        The batch is encoded, classified and scored in one pass per stage; the policy is then
        applied row-wise (:func:`~taskmoe.router.policy.decide_batch`).
        """
        if _is_single(ids):
            return self.route_batch([ids])[0]
        return self.route_batch(ids)

    def route_batch(self, seqs: Sequence[Sequence[int]]) -> list[RoutingDecision]:
        """Route a batch of token-id sequences (one decision each, input order kept)."""
        return self.route_with_vectors(seqs)[0]

    def route_with_vectors(self, seqs: Sequence[Sequence[int]]) -> tuple[list[RoutingDecision], np.ndarray]:
        """:meth:`route_batch` plus the encoder vectors ``(N, D)`` it used (zero rows for unreadable input)."""
        self._check_fitted()
        seqs = _as_lists(seqs)
        out: list[RoutingDecision | None] = [None] * len(seqs)
        ok = self.encoder.readable(seqs) if seqs else np.zeros(0, dtype=bool)
        x = np.zeros((len(seqs), self.centroids.shape[1]), dtype=np.float32)
        for i, s in enumerate(seqs):
            if not ok[i]:
                out[i] = input_fallback(
                    self.n_categories, "empty input" if len(s) == 0 else "no known tokens", self.categories, self.policy.t_C_base
                )
        idx = np.flatnonzero(ok)
        if idx.size:
            rows = [seqs[i] for i in idx]
            x[idx] = self.encoder.encode(rows)
            conf = restrict(self.head.probs(x[idx]), self.unavailable)  # (n, K)
            c_S = self.complexity.score(rows)  # (n,)
            for i, d in zip(idx, decide_batch(conf, c_S, self.policy, self.categories)):
                out[i] = d
        return [without(d, self.unavailable) for d in out if d is not None], x

    def route_text(self, text: str | Sequence[str]) -> RoutingDecision | list[RoutingDecision]:
        """Tokenise with the router's tokenizer, then :meth:`route`."""
        if self.tokenizer is None:
            raise ConfigError("router has no tokenizer: load it from a folder with tokenizer.json or pass tokenizer=")
        if isinstance(text, str):
            return self.route_batch([self.tokenizer.encode(text)])[0]
        return self.route_batch(self.tokenizer.encode_batch(list(text)))

    def encode(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """The encoder's unit vectors ``(N, D)`` (zero rows for unreadable input)."""
        self._check_fitted()
        return self.encoder.encode(_as_lists(seqs))

    # -------------------------------------------------------------------- plug and play
    def add_category(self, name: str, seqs: Sequence[Sequence[int]], description: str = "") -> dict[str, Any]:
        """Add a category from its documents; old decisions stay essentially unchanged.

        The encoder and complexity scorer are untouched (the shared table never moves); the head
        gains an output trained with LoRA + distilled replay (:func:`~taskmoe.router.classifier.add_class`);
        the new centroid is the normalised mean of the new vectors; the replay sample grows.
        Returns metrics (replay agreement, accuracy on the new documents).
        """
        self._check_fitted()
        if not name or name in self.categories:
            raise ConfigError(f"add_category: name must be new and non-empty, got {name!r} (existing: {self.categories})")
        if self.replay is None or len(self.replay.x) == 0:
            raise ConfigError("add_category: this router has no replay sample (fit it with fit_router to keep one)")
        seqs = _as_lists(seqs)
        ok = self.encoder.readable(seqs)
        if not ok.any():
            raise DataError(f"add_category {name!r}: none of the {len(seqs)} documents has a token the router knows")
        x = self.encoder.encode([s for s, o in zip(seqs, ok) if o])
        head, metrics = add_class(self.head, x, self.replay.x, self.classifier_cfg)
        c = x.mean(0)
        c = c / max(float(np.linalg.norm(c)), 1e-12)
        self.head = head
        self.centroids = np.concatenate([self.centroids, c[None].astype(np.float32)])
        self.replay = self.replay.extend(x, self.n_categories, self.classifier_cfg.replay_per_category, self.classifier_cfg.seed)
        self.categories.append(name)
        self.descriptions.append(description)
        metrics.update({"category": name, "documents": int(ok.sum()), "skipped_unreadable": int((~ok).sum())})
        self.report.setdefault("added", []).append(metrics)
        return metrics

    # ---------------------------------------------------------------------------- on disk
    def save(self, folder: str | Path) -> Path:
        """Write the router folder (see the module docstring); :func:`~taskmoe.router.persist.save_router`."""
        from taskmoe.router.persist import save_router

        return save_router(self, folder)

    @classmethod
    def load(cls, folder: str | Path, *, tokenizer: Any = None) -> "Router":
        """Load a router folder; ``tokenizer`` overrides the folder's ``tokenizer.json``
        (:func:`~taskmoe.router.persist.load_router`)."""
        from taskmoe.router.persist import load_router

        return load_router(folder, tokenizer=tokenizer)


def __getattr__(name: str) -> Any:
    """``load_shared_embedding`` lived here before :mod:`taskmoe.router.persist`; keep the old import working."""
    if name == "load_shared_embedding":
        from taskmoe.router.persist import load_shared_embedding

        return load_shared_embedding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe(decision: RoutingDecision) -> str:
    """A one-line JSON form of a decision (for logs and traces)."""
    return json.dumps(decision.to_dict())
