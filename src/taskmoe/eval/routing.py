"""Routing quality against known domains: NMI, purity, ECE, the category x domain table, a 2-D map.

The router never sees domain labels; this module compares its categories to them after the fact.

- **NMI** ``= I(Y; C) / mean(H(Y), H(C))`` (arithmetic mean; scikit-learn's
  ``normalized_mutual_info_score``): 1 when categories and domains are the same partition up to
  renaming, 0 when independent.
- **Purity** ``= (1/N) sum_k max_d |C_k ∩ Y_d|``: the fraction of documents that belong to their
  category's majority domain (1 is perfect; rewards many small categories, so read it with NMI).
- **ECE** of the classifier's calibrated confidences against the discovered categories
  (nearest-centroid pseudo-labels of the evaluated documents), see
  :func:`taskmoe.router.classifier.expected_calibration_error`.
- **Map**: the encoder vectors projected to 2-D by PCA (deterministic, linear, so distances
  keep their meaning), drawn twice: coloured by category and by true domain.

``taskmoe route report`` (:func:`route_report`) runs all of it on a corpus split and writes the
PNG and a ``routing.json`` with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from taskmoe.data.commands import corpus_command
from taskmoe.data.corpus import Corpus
from taskmoe.errors import DataError
from taskmoe.io import atomic_write_json
from taskmoe.router.classifier import expected_calibration_error
from taskmoe.router.clustering import assign_nearest
from taskmoe.router.router import Router


def nmi(true: Sequence[Any], pred: Sequence[Any]) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(list(true), list(pred)))


def purity(true: Sequence[Any], pred: Sequence[Any]) -> float:
    """``(1/N) sum_k max_d |C_k ∩ Y_d|``; e.g. true ``aabb``, pred ``0001`` -> (2 + 1) / 4 = 0.75."""
    true, pred = list(true), list(pred)
    if not true:
        return 0.0
    total = 0
    for k in set(pred):
        members = [t for t, p in zip(true, pred) if p == k]
        total += max(members.count(t) for t in set(members))
    return total / len(true)


def contingency(true: Sequence[Any], pred: Sequence[int], categories: Sequence[str]) -> list[dict[str, Any]]:
    """One row per category: document counts per true domain, plus the row total."""
    domains = sorted({str(t) for t in true})
    rows = []
    for k, name in enumerate(categories):
        row: dict[str, Any] = {"category": name}
        for d in domains:
            row[d] = sum(1 for t, p in zip(true, pred) if p == k and str(t) == d)
        row["total"] = sum(row[d] for d in domains)
        rows.append(row)
    return rows


@dataclass
class RoutingEval:
    """The numbers of one evaluation, and what is needed to draw the map."""

    nmi: float
    purity: float
    ece: float
    n: int
    table: list[dict[str, Any]]
    vectors: np.ndarray = field(repr=False)
    pred: np.ndarray = field(repr=False)
    domains: list[str] = field(repr=False)
    fallback_rate: float = 0.0
    mean_selected: float = 0.0
    crosstalk_rate: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.n, "nmi": round(self.nmi, 4), "purity": round(self.purity, 4), "ece": round(self.ece, 4),
            "fallback_rate": round(self.fallback_rate, 4), "mean_selected": round(self.mean_selected, 3),
            "crosstalk_rate": round(self.crosstalk_rate, 4),
        }  # fmt: skip


def evaluate_routing(router: Router, seqs: Sequence[Sequence[int]], domains: Sequence[str | None], ece_bins: int = 15) -> RoutingEval:
    """Route ``seqs`` and compare the top category with ``domains`` (documents without a domain are skipped)."""
    keep = [i for i, d in enumerate(domains) if d is not None]
    if not keep:
        raise DataError("routing evaluation: no document has a domain label")
    seqs = [seqs[i] for i in keep]
    doms = [str(domains[i]) for i in keep]
    decisions, x = router.route_with_vectors(seqs)
    pred = np.array([d.top for d in decisions])
    conf = np.array([d.confidences for d in decisions])
    pseudo = assign_nearest(x, router.centroids)
    return RoutingEval(
        nmi=nmi(doms, pred), purity=purity(doms, pred), ece=expected_calibration_error(conf, pseudo, ece_bins),
        n=len(seqs), table=contingency(doms, pred, router.categories), vectors=x, pred=pred, domains=doms,
        fallback_rate=float(np.mean([d.fallback for d in decisions])),
        mean_selected=float(np.mean([len(d.selected) for d in decisions])),
        crosstalk_rate=float(np.mean([d.crosstalk is not None for d in decisions])),
    )


def plot_map(ev: RoutingEval, categories: Sequence[str], path: str | Path, title: str = "") -> Path:
    """PCA map of the vectors, coloured by category (left) and by true domain (right) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from taskmoe.io import atomic_write

    xy = PCA(n_components=2, random_state=0).fit_transform(ev.vectors) if len(ev.vectors) >= 2 else np.zeros((len(ev.vectors), 2))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    cmap = plt.get_cmap("tab10")
    for k, name in enumerate(categories):
        m = ev.pred == k
        axes[0].scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.7, color=cmap(k % 10), label=f"{name} ({int(m.sum())})")
    for j, d in enumerate(sorted(set(ev.domains))):
        m = np.array([x == d for x in ev.domains])
        axes[1].scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.7, color=cmap(j % 10), label=f"{d} ({int(m.sum())})")
    axes[0].set_title("discovered category")
    axes[1].set_title("true domain (never shown to the router)")
    for ax in axes:
        ax.legend(fontsize=8, markerscale=2)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.suptitle(title or f"routing map: NMI {ev.nmi:.3f}, purity {ev.purity:.3f}, ECE {ev.ece:.3f}")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def _table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for c in rows[0]:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
    return t


@corpus_command
def route_report(router: Path = Path("runs/default/router"), split: str = "validation", out: Optional[Path] = None, *,
                 corpus: Corpus) -> Any:
    """Evaluate a router against the corpus's true domains: NMI, purity, ECE, table and a 2-D map.

    Routes the --split (validation, test or train) of the default corpus (or --source; documents
    need domain labels), prints the metrics and the category x domain table, and writes
    routing_map.png and routing.json to --out (default: ROUTER/../reports).
    """
    from rich.console import Group
    from rich.text import Text

    r = Router.load(router)
    if r.tokenizer is None:
        raise DataError(f"{router}: the router folder has no tokenizer.json; cannot tokenise the corpus")
    if split not in corpus.splits:
        raise DataError(f"split must be one of {sorted(corpus.splits)}, got {split!r}")
    docs = corpus.splits[split]
    if not docs:
        raise DataError(f"the {split} split is empty")
    ev = evaluate_routing(r, r.tokenizer.encode_batch([d.text for d in docs], allow_special=False), [d.domain for d in docs])
    out = Path(out) if out is not None else Path(router).resolve().parent / "reports"
    png = plot_map(ev, r.categories, out / "routing_map.png")
    js = atomic_write_json(out / "routing.json", {"split": split, **ev.summary(), "table": ev.table, "categories": r.categories, "descriptions": r.descriptions})
    return Group(
        _table([ev.summary()], title=f"routing quality on {split}"),
        _table(ev.table, title="category x domain"),
        Text(f"written: {png}\nwritten: {js}"),
    )
