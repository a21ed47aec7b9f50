"""Do the experts disagree? Semantic similarity of their drafts plus intent consistency -> one score.

The seed: "if the summarizer detects that the experts disagree or have gone off track via the
intent mechanism, it ignores everything and asks for clarification." Here:

- **Semantic agreement** ``S_sem``: drafts are embedded with an injected encoder (the router's,
  ``router.encoder.encode``: unit rows), and
  ``S_sem = sum_{i<j} w_i w_j max(cos_ij, 0) / sum_{i<j} w_i w_j`` with ``w`` the router
  confidences, so a disagreement between two confident experts counts more than one with a
  marginal expert. Negative cosines count as no agreement. Drafts the encoder cannot read (empty,
  or no known token: an all-zero row) are left out; with fewer than two readable drafts there is
  nothing to disagree with and ``S_sem = 1``.
- **Intent consistency** ``S_int``: each draft (and the prompt) gets an intent distribution
  from the intent classifier; with total-variation distance ``TV(p, q) = 1/2 sum_k |p_k - q_k|``,
  ``S_int = 1 - mean(TV_drafts, TV_prompt)`` where ``TV_drafts`` is the confidence-weighted
  mean TV over draft pairs (the experts talk about different kinds of thing) and ``TV_prompt``
  the confidence-weighted mean TV of each draft to the prompt (an expert went off track). Terms
  that do not apply (one draft, no prompt intent) are left out; with none left, ``S_int = 1``.
- **Score** ``D = 1 - (lambda_sem * S_sem + (1 - lambda_sem) * S_int)`` in [0, 1], and
  ``D = 1 - S_sem`` when no intent classifier is given (the weight is not spent on a constant);
  ``D > threshold`` means the summarizer ignores the drafts and asks the clarification question
  built by :func:`clarification`, which names the least-similar pair of experts, their
  confidences, and each one's distinctive keywords (and a topic label if given).
- The threshold is configurable; :func:`calibrate_threshold` picks the one with the best F1 on
  labelled examples (planted conflicts vs natural agreements) and reports its precision and
  recall, which is how the default system chooses it.

Glossary: ``w_i`` router confidence of draft ``i``, ``cos_ij`` cosine of draft embeddings,
``lambda_sem`` = ``semantic_weight``, ``D`` disagreement score.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from taskmoe.config import Config, check_min, check_range, doc
from taskmoe.errors import ConfigError, DataError

__all__ = [
    "DisagreementConfig",
    "DisagreementReport",
    "semantic_agreement",
    "intent_consistency",
    "disagreement_score",
    "assess",
    "assess_embedded",
    "keywords",
    "clarification",
    "precision_recall",
    "calibrate_threshold",
]

Encode = Callable[[Sequence[Sequence[int]]], "np.ndarray | torch.Tensor"]
IntentProbs = Callable[[Sequence[Sequence[int]]], "np.ndarray | torch.Tensor"]


@dataclass
class DisagreementConfig(Config):
    """When do the drafts disagree enough to ask the user instead of answering?"""

    threshold: float = doc(0.5, "disagreement score D above which the summarizer asks for clarification")
    semantic_weight: float = doc(0.7, "lambda_sem: weight of semantic agreement vs intent consistency in D")
    n_keywords: int = doc(4, "distinctive keywords named per expert in the clarification question")

    def validate(self) -> None:
        check_range(self, ("threshold", "semantic_weight"))
        check_min(self, ("n_keywords",), 1)


@dataclass
class DisagreementReport:
    """What :func:`assess` found; ``to_dict`` goes into the pipeline trace."""

    score: float
    semantic_agreement: float
    intent_consistency: float
    threshold: float
    experts: list[str]
    similarity: list[list[float]]
    """(n, n) cosine matrix of the draft embeddings, rows in ``experts`` order."""
    conflict: tuple[str, str] | None = None
    """The least similar pair of experts (or the off-track expert twice), if any."""
    intents: list[str] = field(default_factory=list)
    prompt_intent: str | None = None

    @property
    def clarify(self) -> bool:
        return self.score > self.threshold

    def to_dict(self) -> dict:
        return {
            "score": self.score, "semantic_agreement": self.semantic_agreement,
            "intent_consistency": self.intent_consistency, "threshold": self.threshold,
            "clarify": self.clarify, "experts": self.experts, "conflict": list(self.conflict) if self.conflict else None,
            "intents": self.intents, "prompt_intent": self.prompt_intent,
            "similarity": self.similarity,
        }


def _np(x: "np.ndarray | torch.Tensor") -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _pair_weights(w: np.ndarray) -> np.ndarray:
    """(n, n) w_i w_j on the strict upper triangle, 0 elsewhere."""
    return np.triu(np.outer(w, w), k=1)


def cosine_matrix(emb: np.ndarray) -> np.ndarray:
    """(n, n) cosines; an all-zero (unreadable) row has cosine 0 with everything."""
    e = np.asarray(emb, dtype=np.float64)
    n = np.linalg.norm(e, axis=1, keepdims=True)
    u = np.divide(e, n, out=np.zeros_like(e), where=n > 0)
    return u @ u.T


def semantic_agreement(cos: np.ndarray, weights: Sequence[float]) -> float:
    """``S_sem = sum_{i<j} w_i w_j max(cos_ij, 0) / sum_{i<j} w_i w_j``; 1 with fewer than two drafts.

    Example: cos_12 = 0.8, cos_13 = cos_23 = 0, w = (1, 1, 1) -> 0.8 / 3.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) < 2:
        return 1.0
    pw = _pair_weights(np.maximum(w, 1e-6))  # a zero-confidence draft still counts a little
    return float((pw * np.clip(cos, 0.0, None)).sum() / pw.sum())


def _tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(-1)


def intent_consistency(draft_probs: np.ndarray | None, weights: Sequence[float], prompt_probs: np.ndarray | None = None) -> float:
    """``S_int = 1 - mean(TV_drafts, TV_prompt)`` over the terms that apply (see module docstring).

    Example: drafts p = (1, 0), (0, 1), w = (1, 1), no prompt -> TV = 1 -> S_int = 0.
    """
    if draft_probs is None:
        return 1.0
    p = np.asarray(draft_probs, dtype=np.float64)  # (n, K)
    w = np.maximum(np.asarray(weights, dtype=np.float64), 1e-6)
    terms = []
    if len(p) >= 2:
        pw = _pair_weights(w)
        tv = _tv(p[:, None, :], p[None, :, :])  # (n, n)
        terms.append(float((pw * tv).sum() / pw.sum()))
    if prompt_probs is not None and len(p):
        q = np.asarray(prompt_probs, dtype=np.float64).reshape(-1)
        terms.append(float((w * _tv(p, q[None, :])).sum() / w.sum()))
    return 1.0 - float(np.mean(terms)) if terms else 1.0


def disagreement_score(s_sem: float, s_int: float, semantic_weight: float) -> float:
    """``D = 1 - (lambda_sem * S_sem + (1 - lambda_sem) * S_int)``."""
    return float(1.0 - (semantic_weight * s_sem + (1.0 - semantic_weight) * s_int))


def assess(
    experts: Sequence[str],
    confidences: Sequence[float],
    draft_ids: Sequence[Sequence[int]],
    encode: Encode,
    cfg: DisagreementConfig | None = None,
    *,
    intent_probs: IntentProbs | None = None,
    intent_labels: Sequence[str] | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> DisagreementReport:
    """Score how much the drafts disagree.

    ``encode(seqs) -> (n, D)`` embeds drafts (the router's encoder). ``intent_probs(seqs) ->
    (n, K)`` (optional) gives intent distributions, with ``intent_labels`` naming the K columns;
    with ``prompt_ids`` the prompt's intent is compared too. Computes the inputs and calls
    :func:`assess_embedded` (which a batched caller uses directly, with inputs computed once).
    """
    n = len(experts)
    if not (n == len(confidences) == len(draft_ids)):
        raise DataError(f"assess: {n} experts, {len(confidences)} confidences, {len(draft_ids)} drafts")
    if n == 0:
        raise DataError("assess: no drafts to compare")
    emb = _np(encode([list(d) for d in draft_ids]))
    p = q = None
    if intent_probs is not None:
        seqs = [list(d) for d in draft_ids] + ([list(prompt_ids)] if prompt_ids is not None else [])
        probs = _np(intent_probs(seqs)).astype(np.float64)
        p, q = probs[:n], (probs[n] if prompt_ids is not None else None)
    return assess_embedded(experts, confidences, emb, cfg, draft_probs=p, prompt_probs=q, intent_labels=intent_labels)


def assess_embedded(
    experts: Sequence[str],
    confidences: Sequence[float],
    embeddings: "np.ndarray | torch.Tensor",
    cfg: DisagreementConfig | None = None,
    *,
    draft_probs: "np.ndarray | torch.Tensor | None" = None,
    prompt_probs: "np.ndarray | torch.Tensor | None" = None,
    intent_labels: Sequence[str] | None = None,
) -> DisagreementReport:
    """:func:`assess` on precomputed inputs: draft embeddings ``(n, D)``, draft intent
    probabilities ``(n, K)`` and the prompt's ``(K,)`` (each optional), labels naming the K columns."""
    cfg = cfg or DisagreementConfig()
    n = len(experts)
    emb = _np(embeddings)
    if n == 0:
        raise DataError("assess: no drafts to compare")
    if emb.shape[0] != n:
        raise DataError(f"encoder returned {emb.shape[0]} rows for {n} drafts")
    cos = cosine_matrix(emb)
    ok = np.flatnonzero(np.linalg.norm(emb, axis=1) > 0)  # empty/unreadable drafts say nothing either way
    s_sem = semantic_agreement(cos[np.ix_(ok, ok)], [confidences[i] for i in ok])
    p = None if draft_probs is None else _np(draft_probs).astype(np.float64)
    q = None if prompt_probs is None or p is None else _np(prompt_probs).astype(np.float64).reshape(-1)
    intents: list[str] = []
    prompt_intent = None
    if p is not None:
        labels = list(intent_labels) if intent_labels is not None else [str(k) for k in range(p.shape[1])]
        if len(labels) != p.shape[1]:
            raise ConfigError(f"intent_labels has {len(labels)} names for {p.shape[1]} intent columns")
        intents = [labels[int(i)] for i in p.argmax(1)]
        prompt_intent = labels[int(q.argmax())] if q is not None else None
    s_int = intent_consistency(p, confidences, q)
    score = disagreement_score(s_sem, s_int, cfg.semantic_weight if p is not None else 1.0)
    conflict = None
    if len(ok) >= 2:
        sub = cos[np.ix_(ok, ok)]
        iu = np.triu_indices(len(ok), k=1)
        k = int(np.argmin(sub[iu]))
        conflict = (experts[int(ok[iu[0][k]])], experts[int(ok[iu[1][k]])])
    elif prompt_intent is not None and intents and intents[0] != prompt_intent:
        conflict = (experts[0], experts[0])
    return DisagreementReport(
        score=score, semantic_agreement=s_sem, intent_consistency=s_int, threshold=cfg.threshold,
        experts=list(experts), similarity=cos.round(4).tolist(), conflict=conflict,
        intents=intents, prompt_intent=prompt_intent,
    )


# --------------------------------------------------------------------- the question itself
_STOP = frozenset(
    "the and for that this with from are was were been have has had not but you your they them their its "
    "his her she him our out all any can will would there what which who when where how into than then "
    "also may such other more some these those each one two very just over only about under upon".split()
)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")


def keywords(texts: Sequence[str], n: int = 4) -> list[list[str]]:
    """For each text, up to ``n`` words most distinctive of it against the others.

    Score of word ``v`` in text ``i``: ``count_i(v) - max_{j != i} count_j(v)``; only positive
    scores count; ties by higher count, then alphabetically. Words are lower-cased identifiers of
    3+ characters outside a small stop list.
    """
    counts = [Counter(w.lower() for w in _WORD.findall(t) if w.lower() not in _STOP) for t in texts]
    out = []
    for i, c in enumerate(counts):
        others = [counts[j] for j in range(len(counts)) if j != i]
        scored = [(c[v] - max((o[v] for o in others), default=0), c[v], v) for v in c]
        scored = [s for s in scored if s[0] > 0]
        scored.sort(key=lambda s: (-s[0], -s[1], s[2]))
        out.append([v for _, _, v in scored[:n]])
    return out


def clarification(
    report: DisagreementReport,
    draft_texts: Mapping[str, str],
    confidences: Mapping[str, float],
    *,
    topics: Mapping[str, str] | None = None,
    n_keywords: int = 4,
) -> str:
    """The clarification question naming what conflicts.

    Names the conflicting experts (``report.conflict``), their confidences, an optional topic
    label per expert (e.g. the router category's name), and each one's distinctive keywords.
    """
    if report.conflict is None:
        raise ConfigError("clarification: the report names no conflict (fewer than two drafts and no intent mismatch)")
    a, b = report.conflict
    topics = topics or {}

    def who(name: str, kw: list[str]) -> str:
        topic = f" ({topics[name]})" if name in topics else ""
        about = f" talks about {', '.join(kw)}" if kw else ""
        return f"the '{name}' expert{topic}, confidence {confidences.get(name, 0.0):.2f},{about}"

    if a == b:  # one expert went off track relative to the prompt's intent
        kw = keywords([draft_texts.get(a, "")], n_keywords)[0]
        return (
            f"I am not sure I understood: your request reads as '{report.prompt_intent}', but "
            f"{who(a, kw)} and reads as '{report.intents[0] if report.intents else '?'}'. "
            "Could you clarify what you are asking for?"
        )
    kw_a, kw_b = keywords([draft_texts.get(a, ""), draft_texts.get(b, "")], n_keywords)
    return (
        f"The experts disagree (disagreement {report.score:.2f}): {who(a, kw_a)}; "
        f"{who(b, kw_b)}. Which of these do you mean? Please clarify your request."
    )


# ------------------------------------------------------------------------- calibration
def precision_recall(scores: Sequence[float], is_conflict: Sequence[bool], threshold: float) -> tuple[float, float]:
    """Precision and recall of ``score > threshold`` as a conflict detector (0 when undefined)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_conflict, dtype=bool)
    pred = s > threshold
    tp = float((pred & y).sum())
    precision = tp / pred.sum() if pred.sum() else 0.0
    recall = tp / y.sum() if y.sum() else 0.0
    return float(precision), float(recall)


def calibrate_threshold(scores: Sequence[float], is_conflict: Sequence[bool]) -> dict[str, float]:
    """The threshold with the best F1 among midpoints between sorted scores (ties: the higher one).

    Returns ``{"threshold", "precision", "recall", "f1"}``. Needs at least one example of each
    class.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    y = np.asarray(is_conflict, dtype=bool)
    if len(s) != len(y) or not y.any() or y.all():
        raise DataError("calibrate_threshold needs matching scores/labels with both conflicts and agreements")
    cands = np.unique(np.clip(np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2]), 0.0, 1.0))
    best = None
    for t in cands:
        p, r = precision_recall(scores, is_conflict, float(t))
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if best is None or f1 >= best["f1"]:
            best = {"threshold": float(t), "precision": p, "recall": r, "f1": f1}
    assert best is not None
    return best
