"""Which DOE expert takes which domain: each window's chosen expert, the expert x domain table, NMI and
purity of the choice vs the (evaluation-only) domain label, and a heatmap PNG.

``data`` is any map-style set of windows whose items hold ``input_ids`` (T,) and ``prompt_mask``
(T,) and which carries ``domains`` (N,) (index into the domain names, -1 unknown), such as the DOE
recipe's :class:`~taskmoe.training.recipes.doe.DocumentWindows`. Routing is the eval-mode decision
from each window's prompt (threshold ``tau``, fallback to the default expert).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from taskmoe.doe.model import DOETransformer
from taskmoe.errors import DataError
from taskmoe.eval.routing import contingency, nmi, purity
from taskmoe.io import atomic_write_json

__all__ = ["expert_choices", "routing_report", "plot_heatmap"]


@torch.no_grad()
def expert_choices(model: DOETransformer, data: Any, batch_size: int = 32) -> tuple[list[int], list[bool]]:
    """Each window's best expert (eval routing from its prompt) and whether it fell back to the default."""
    was = model.training
    model.eval()
    top, fb = [], []
    try:
        for i in range(0, len(data), batch_size):
            b = [data[j] for j in range(i, min(len(data), i + batch_size))]
            r = model.route(torch.stack([x["input_ids"] for x in b]), torch.stack([x["prompt_mask"] for x in b]))
            top += r.top1().tolist()
            fb += r.fallback.tolist()
    finally:
        model.train(was)
    return top, fb


def routing_report(model: DOETransformer, data: Any, domains: Sequence[str], out_dir: Path,
                   *, title: str = "DOE: expert chosen vs domain") -> dict[str, Any]:
    """Expert x domain counts, NMI and purity of the chosen expert vs domain, and a heatmap PNG."""
    top, fb = expert_choices(model, data)
    dom = data.domains.tolist()
    known = [i for i, d in enumerate(dom) if d >= 0]
    if not known:
        raise DataError("routing report: no window has a known domain (the corpus carries no domain labels)")
    true = [domains[dom[i]] for i in known]
    pred = [top[i] for i in known]
    names = list(model.expert_names)
    table = contingency(true, pred, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_heatmap(table, names, sorted(set(true)), out_dir / "doe_routing.png", title)
    report = {"windows": len(known), "nmi": nmi(true, pred), "purity": purity(true, pred),
              "fallback_rate": sum(fb[i] for i in known) / len(known), "table": table, "plot": str(png)}
    atomic_write_json(out_dir / "doe_routing.json", report)
    return report


def plot_heatmap(table: list[dict[str, Any]], experts: Sequence[str], domains: Sequence[str], path: Path,
                 title: str) -> Path:
    """Share of each domain's windows taken by each expert (columns sum to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array([[row.get(d, 0) for d in domains] for row in table], dtype=float)  # (E, domains)
    share = counts / np.maximum(1.0, counts.sum(axis=0, keepdims=True))
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(domains), 1.0 + 0.5 * len(experts)))
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(experts)), experts)
    for i in range(share.shape[0]):
        for j in range(share.shape[1]):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color="w" if share[i, j] < 0.6 else "k")
    ax.set_xlabel("domain (evaluation-only label)")
    ax.set_ylabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of the domain's windows")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
