"""Intent detection from embeddings: a multinomial logistic-regression head over pooled prompt vectors.

The seed's summarizer "detects intent via embeddings"; on coding intent it runs with the coding
LoRA adapter. Here:

- **Features** come from an injected *featurizer* ``f(seqs) -> (N, D)``. The default,
  :func:`pooled_hidden`, mean-pools the summarizer's own final hidden states over the prompt
  tokens (what the seed means by "its token embeddings"); the router's encoder
  (``router.encoder.encode``) works too and is cheaper. The classifier stores which one it was
  fitted on (``feature`` in its config) so it is never applied to the wrong vectors.
- **Classifier**: standardise features (``z = (x - mu) / sigma``), then
  ``p(c | x) = softmax(W z + b)_c``, fitted with scikit-learn's ``LogisticRegression`` (L2,
  ``C``, balanced class weights: the code domain is a minority) and evaluated in torch. A
  binary fit's single logit ``w`` is stored as the two rows ``(-w/2, +w/2)``, whose softmax is
  exactly ``sigmoid(w z + b)``, so prediction has one code path for any number of intents.
- **Labels** come from the corpus's domain labels mapped to intents (default: domain ``code``
  -> intent ``code``, everything else -> ``other``). The design keeps domain labels for
  evaluation only, but an intent head is a *supervised* classifier by definition: it has to be
  told what "coding intent" means, and the code domain is exactly the data the coding adapter
  is trained on, so the two agree on what "code" is. Routing stays unsupervised.
- Saved as a component folder (``kind = "intent_classifier"``): config.json (labels, feature
  name, C) + model.safetensors (W, b, mu, sigma).

Glossary: ``N`` examples, ``D`` feature width, ``K`` intents, ``W`` (K, D), ``b`` (K,),
``mu``/``sigma`` (D,) standardisation statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError, DataError
from taskmoe.io import load_component, save_component

__all__ = [
    "Featurizer",
    "IntentClassifier",
    "IntentResult",
    "domain_intents",
    "pooled_hidden",
]

INTENT_KIND = "intent_classifier"
Featurizer = Callable[[Sequence[Sequence[int]]], "np.ndarray | torch.Tensor"]
"""``f(seqs) -> (N, D)`` feature rows for token-id sequences."""


def domain_intents(domains: Sequence[str | None], mapping: Mapping[str, str] | None = None, default: str = "other") -> list[str]:
    """Map corpus domain labels to intent labels (default: ``code`` -> ``code``, rest -> ``other``)."""
    mapping = {"code": "code"} if mapping is None else dict(mapping)
    return [mapping.get(d or "", default) for d in domains]


@torch.no_grad()
def pooled_hidden(model: nn.Module, seqs: Sequence[Sequence[int]], *, pad_id: int = 0, batch_size: int = 16) -> torch.Tensor:
    """Mean of ``model(ids).hidden`` over each sequence's real tokens, shape (N, D).

    ``model`` is a taskmoe ``CausalLM`` (its forward returns ``.hidden`` (B, T, D)). Sequences
    are right-padded per batch and padding is excluded from the mean; with a causal model the
    real positions do not see the padding, so the result does not depend on batching.
    """
    if not len(seqs):
        raise DataError("pooled_hidden: no sequences")
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    try:
        for s in range(0, len(seqs), batch_size):
            chunk = [list(x) for x in seqs[s : s + batch_size]]
            if any(len(x) == 0 for x in chunk):
                raise DataError("pooled_hidden: empty sequence")
            T = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), T), int(pad_id), dtype=torch.long)
            mask = torch.zeros(len(chunk), T)
            for b, x in enumerate(chunk):
                ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[b, : len(x)] = 1.0
            hidden = model(ids).hidden.float()  # (B, T, D)
            rows.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))  # (B, D)
    finally:
        model.train(was_training)
    return torch.cat(rows)


@dataclass(frozen=True)
class IntentResult:
    """The detected intent of one prompt and the probability of every intent."""

    label: str
    probs: dict[str, float]

    def to_dict(self) -> dict:
        return {"label": self.label, "probs": dict(self.probs)}


def _as_tensor(x: "np.ndarray | torch.Tensor") -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.dim() != 2:
        raise DataError(f"intent features must be (N, D), got shape {tuple(t.shape)}")
    return t


class IntentClassifier(nn.Module):
    """``p(intent | x) = softmax(W (x - mu) / sigma + b)``; fit with :meth:`fit`, then predict."""

    def __init__(self, labels: Sequence[str], dim: int, *, feature: str = "summarizer_hidden", C: float = 1.0) -> None:
        super().__init__()
        labels = list(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ConfigError(f"intent labels must be >= 2 distinct names, got {labels}")
        if dim < 1 or C <= 0:
            raise ConfigError(f"intent classifier needs dim >= 1 and C > 0, got dim={dim}, C={C}")
        self.labels, self.feature, self.C = labels, feature, float(C)
        self.register_buffer("weight", torch.zeros(len(labels), dim))  # (K, D)
        self.register_buffer("bias", torch.zeros(len(labels)))  # (K,)
        self.register_buffer("mu", torch.zeros(dim))  # (D,)
        self.register_buffer("sigma", torch.ones(dim))  # (D,)
        self.fitted = False

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def fit(self, features: "np.ndarray | torch.Tensor", labels: Sequence[str], *, seed: int = 0) -> "IntentClassifier":
        """Fit on ``features`` (N, D) with one intent label per row."""
        from sklearn.linear_model import LogisticRegression

        x = _as_tensor(features)
        if x.shape[1] != self.dim:
            raise DataError(f"intent features have width {x.shape[1]}, classifier expects {self.dim}")
        if len(labels) != x.shape[0]:
            raise DataError(f"{x.shape[0]} feature rows but {len(labels)} labels")
        unknown = sorted(set(labels) - set(self.labels))
        if unknown:
            raise DataError(f"intent labels {unknown} are not among the classifier's {self.labels}")
        present = sorted(set(labels), key=self.labels.index)
        if len(present) < 2:
            raise DataError(f"intent training data holds only {present}; need examples of at least two intents")
        mu = x.mean(0)
        sigma = x.std(0, unbiased=False).clamp_min(1e-6)
        z = ((x - mu) / sigma).numpy().astype(np.float64)
        y = np.array([self.labels.index(l) for l in labels])
        lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=2000, random_state=seed).fit(z, y)
        W = torch.zeros_like(self.weight, dtype=torch.float64)
        b = torch.full((len(self.labels),), -1e4, dtype=torch.float64)  # absent intents: never predicted
        coef, icpt = torch.from_numpy(lr.coef_), torch.from_numpy(lr.intercept_)
        idx = torch.tensor([int(c) for c in lr.classes_])
        if len(idx) == 2:  # one logit w: rows (-w/2, +w/2) give softmax == sigmoid(w z + b)
            W[idx[0]], W[idx[1]] = -coef[0] / 2, coef[0] / 2
            b[idx[0]], b[idx[1]] = -icpt[0] / 2, icpt[0] / 2
        else:
            W[idx], b[idx] = coef, icpt
        self.weight.copy_(W.float())
        self.bias.copy_(b.float())
        self.mu.copy_(mu)
        self.sigma.copy_(sigma)
        self.fitted = True
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Intent probabilities (N, K)."""
        if not self.fitted:
            raise ConfigError("intent classifier is not fitted: call fit() or IntentClassifier.load(folder)")
        x = _as_tensor(features)
        if x.shape[1] != self.dim:
            raise DataError(f"intent features have width {x.shape[1]}, classifier expects {self.dim} "
                            f"(it was fitted on '{self.feature}' features)")
        return torch.softmax(((x - self.mu) / self.sigma) @ self.weight.T + self.bias, dim=-1)

    @torch.no_grad()
    def predict(self, features: "np.ndarray | torch.Tensor") -> list[IntentResult]:
        probs = self(_as_tensor(features))
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(IntentResult(self.labels[best], {l: float(p) for l, p in zip(self.labels, row)}))
        return out

    def accuracy(self, features: "np.ndarray | torch.Tensor", labels: Sequence[str]) -> float:
        pred = [r.label for r in self.predict(features)]
        if len(pred) != len(labels) or not pred:
            raise DataError(f"accuracy: {len(pred)} predictions vs {len(labels)} labels")
        return float(np.mean([p == l for p, l in zip(pred, labels)]))

    # -- disk -------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        if not self.fitted:
            raise ConfigError("refusing to save an unfitted intent classifier")
        cfg = {"labels": self.labels, "dim": self.dim, "feature": self.feature, "C": self.C}
        return save_component(folder, INTENT_KIND, cfg, {k: v for k, v in self.state_dict().items()})

    @classmethod
    def load(cls, folder: str | Path) -> "IntentClassifier":
        comp = load_component(folder, INTENT_KIND)
        c = comp.config
        try:
            clf = cls(c["labels"], int(c["dim"]), feature=str(c["feature"]), C=float(c["C"]))
        except KeyError as e:
            raise CheckpointError(f"{comp.folder / 'config.json'}: missing field {e}") from e
        from taskmoe.io import load_state_into

        load_state_into(clf, comp.weights)
        clf.fitted = True
        return clf
