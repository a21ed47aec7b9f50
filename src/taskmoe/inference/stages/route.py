"""The Route stage: one routing pass over every live row (:meth:`Router.route_batch`).

Writes ``row.decision`` (confidences, c_S, t_C, selected experts and their weights, fallback,
cross-talk pair, the categories that joined the selection for the dialogue) and the trace's
``routing`` (the decision as a dict plus ``selected_names``). Timed as ``route``.
"""

from __future__ import annotations

from typing import Any

from taskmoe.inference.stages.base import Call, Row

__all__ = ["Route"]


class Route:
    """Route every live row once; ``router`` is anything with ``route_batch(seqs) -> decisions``."""

    name = "route"

    def __init__(self, router: Any) -> None:
        self.router = router

    def __call__(self, rows: list[Row], call: Call) -> list[Row]:
        todo = call.live(rows, self.name)
        if todo:
            with call.clock("route"):
                decisions = self.router.route_batch([r.prompt for r in todo])
            for r, d in zip(todo, decisions):
                r.decision = d
                r.trace.routing = {**d.to_dict(), "selected_names": d.selected_names}
        return rows
