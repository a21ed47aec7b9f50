"""CLI command of the router layer: ``taskmoe route predict`` (also a Python function).

``route fit`` lives in :mod:`taskmoe.training.recipes.router` (it needs the train loop) and
``route report`` in :mod:`taskmoe.eval.routing` (it needs the evaluation metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskmoe.errors import ConfigError
from taskmoe.router.policy import RoutingDecision
from taskmoe.router.router import Router


def decision_table(decision: RoutingDecision, descriptions: list[str] | None = None) -> Any:
    """A rich table of one decision: a row per category, the policy values in the caption."""
    from rich.table import Table

    caption = (
        f"c_S = {decision.c_S:.3f}   t_C = {decision.t_C:.3f}   fallback = {decision.fallback}"
        f"{' (' + decision.reason + ')' if decision.reason else ''}   cross-talk = "
        + (" <-> ".join(decision.categories[i] for i in decision.crosstalk) if decision.crosstalk else "none")
    )
    t = Table(title="routing decision", caption=caption)
    for col in ("category", "confidence", "selected", "weight", "about"):
        t.add_column(col)
    weight = dict(zip(decision.selected, decision.weights))
    for i, name in enumerate(decision.categories):
        t.add_row(
            name, f"{decision.confidences[i]:.4f}", "yes" if i in weight else "", f"{weight[i]:.4f}" if i in weight else "",
            (descriptions[i] if descriptions and i < len(descriptions) else ""),
        )
    return t


def route_predict(text: str, router: Path = Path("runs/default/router")) -> Any:
    """Route one text with a saved router and print the decision as a table.

    Shows each category's calibrated confidence, which experts are selected and their weights,
    the complexity c_S, the threshold t_C, the fallback flag and the cross-talk pair.
    """
    r = Router.load(router)
    if r.tokenizer is None:
        raise ConfigError(f"{router}: the router folder has no tokenizer.json; cannot tokenise text")
    d = r.route_text(text)
    assert isinstance(d, RoutingDecision)
    return decision_table(d, r.descriptions)
