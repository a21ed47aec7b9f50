"""The seed's pruning during *expert training* (:mod:`taskmoe.experts.pruning` holds the rule).

Each expert trains alone on the windows its documents were routed to. A training window is one
feed-forward; the expert *contributes* to it when the router, reading that window, gives the
expert's category a weight (:func:`window_route_weights`: selected, or every category on a
fallback, with its renormalised confidence). An expert that contributes to fewer than 3 of a
window of 10 of its own training sequences, the ones it is being trained on, does not serve its
category: it is pruned, its training stops (the loop's callback asks it to), it is not saved, and
the run's manifest records it under ``pruned`` so the pipeline routes its category to the
remaining experts. The run never loses more than ``keep_at_least`` experts this way
(:func:`expert_pruning`).

Mixture training (:mod:`taskmoe.training.recipes.mixture`) uses the same tracker on the
mixture's own routing weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from taskmoe.experts.pruning import ContributionTracker, PruningCallback, PruningConfig
from taskmoe.io import read_json
from taskmoe.manifest import MANIFEST_FILE

__all__ = ["window_route_weights", "expert_pruning", "pruned_names"]


def window_route_weights(router: Any, windows: Sequence[torch.Tensor], category: int, batch: int = 1024) -> torch.Tensor:
    """``(N,)`` the routing weight the router gives ``category`` for each window (0 when not selected)."""
    out: list[float] = []
    for s in range(0, len(windows), batch):
        for d in router.route_batch([w.tolist() for w in windows[s : s + batch]]):
            out.append(dict(zip(d.selected, d.weights)).get(category, 0.0))
    return torch.tensor(out, dtype=torch.float32)


def pruned_names(run_dir: Path) -> dict[str, dict]:
    """Expert name -> pruning record of every expert ``run_dir/taskmoe.json`` lists as pruned."""
    path = Path(run_dir) / MANIFEST_FILE
    pruned = read_json(path).get("pruned", {}) if path.is_file() else {}
    return {rec.get("expert", k): rec for k, rec in pruned.items()}


def expert_pruning(name: str, weights: torch.Tensor, cfg: PruningConfig, others_active: int,
                   loss_fn: Callable[[Any, Any], Any]) -> tuple[Callable[[Any, Any], Any], PruningCallback]:
    """``(loss_fn that reports each training batch, the loop callback)`` for training expert ``name``
    alone (module docstring).

    ``weights[i]`` is the router's weight for the expert on training window ``i`` (the batch's
    ``rows`` say which windows it holds); ``others_active`` is how many other experts of the run
    are not pruned, so the expert may be pruned only while ``keep_at_least`` would still hold.
    """
    keep = 1 if others_active < cfg.keep_at_least else 0
    cb = PruningCallback(ContributionTracker([name], cfg.replace(keep_at_least=keep)))
    rows = lambda batch: [{name: float(w)} for w in weights[batch["rows"].cpu()].tolist()]  # noqa: E731
    return cb.wrap(loss_fn, rows), cb
