"""The Crosstalk stage: rows whose router flagged a pair run the two experts' dialogue, batched per pair.

Flagged rows are grouped by their (unordered) expert pair and each group is ONE call of the
runner's batched protocol (:class:`CrosstalkRunner`, implemented by
:class:`taskmoe.crosstalk.runner.CrosstalkRunner` over :func:`~taskmoe.crosstalk.dialogue.run_dialogues`):
every row of the group decodes in the same forward passes. The transcript replaces the pair's
drafts in the summarizer's input (one draft per speaker, attribution kept); the trace's
``crosstalk`` holds the pair, its categories, whether the dialogue ran (and why not), whether the
speakers had trained cross-talk adapters, and the turns. Tokens stream as stage ``"crosstalk"``
with the speaking expert; a row whose control says stop leaves the dialogue at once. Timed as
``crosstalk``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Mapping, Protocol, Sequence

from torch import nn

from taskmoe.inference.stages.base import Call, ExpertStage, Row
from taskmoe.inference.stages.draft import record_drafts
from taskmoe.summarizer.fuser import Draft, order_drafts

__all__ = ["CrosstalkRunner", "Crosstalk"]


class CrosstalkRunner(Protocol):
    """The batched cross-talk hook (plain types only, so the cross-talk package implements it).

    ``run_batch(prompts, speakers, confidences, drafts, emit) -> [(drafts, turns)]``: ``prompts``
    per row (no BOS); ``speakers`` the two experts ``[(name, model)] * 2``, shared by every row;
    ``confidences`` per row, the router confidences of speaker 0 and 1 (the more confident opens);
    ``drafts`` per row, the pair's independent drafts; ``emit(row, token, speaker) -> bool`` after
    each token (False halts that row). Returns per row the drafts that replace the pair's and the
    turns as JSON-safe dicts (e.g. ``{"expert", "text", "interrupted", "p_interrupt"}``).
    """

    def run_batch(self, prompts: Sequence[Sequence[int]], speakers: Sequence[tuple[str, nn.Module]],
                  confidences: Sequence[tuple[float, float]], drafts: Sequence[Sequence[Draft]],
                  emit: Callable[[int, int, int], bool] | None = None) -> list[tuple[list[Draft], list[dict[str, Any]]]]: ...


class Crosstalk(ExpertStage):
    """Run the flagged rows' dialogues (``runner`` None: the trace says none is configured)."""

    name = "crosstalk"

    def __init__(self, runner: CrosstalkRunner | None, expert_of: Mapping[str, str], tokenizer: Any) -> None:
        super().__init__(expert_of, tokenizer)
        self.runner = runner

    def _flag(self, r: Row) -> tuple[str, str] | None:
        """Write the row's cross-talk trace entry; the pair to run, or None (with the reason)."""
        d = r.decision
        assert d is not None and d.crosstalk is not None
        info = self.crosstalk_entry(d)
        pair = (info["pair"][0], info["pair"][1])
        r.trace.crosstalk = info
        if self.runner is None:
            info["reason"] = "no cross-talk runner configured"
        elif not r.cfg.crosstalk:
            info["reason"] = "switched off (pipeline setting crosstalk = false)"
        elif pair[0] == pair[1]:
            info["reason"] = f"both categories are served by the one expert '{pair[0]}'"
        else:
            info["adapters"] = "trained" if getattr(self.runner, "trained", True) else "none (untrained: base weights)"
            return pair
        return None

    def __call__(self, rows: list[Row], call: Call) -> list[Row]:
        groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
        for r in call.live(rows, self.name):
            if r.decision is not None and r.decision.crosstalk is not None:
                pair = self._flag(r)
                if pair is not None:
                    groups[tuple(sorted(pair))].append(r)  # type: ignore[index]
        with call.clock("crosstalk"):
            for names, group in sorted(groups.items()):
                self._run(names, [r for r in group if r.live and not r.check(self.name)], call)
        return rows

    def _run(self, names: tuple[str, str], group: list[Row], call: Call) -> None:
        if not group:
            return
        assert self.runner is not None
        speakers = [(n, call.store.get(n)) for n in names]
        conf = []
        for r in group:
            d = r.decision
            assert d is not None
            of = {self.expert_of[d.categories[i]]: float(d.confidences[i]) for i in d.selected}
            conf.append((of[names[0]], of[names[1]]))
        emits = [[call.emit(r, "crosstalk", n) for n in names] for r in group]
        results = self.runner.run_batch([r.prompt for r in group], speakers, conf,
                                        [[x for x in r.drafts if x.expert in names] for r in group],
                                        lambda i, tok, who: emits[i][who](tok))
        for r, (new, turns) in zip(group, results):
            r.drafts = order_drafts([x for x in r.drafts if x.expert not in names] + list(new))
            assert r.trace.crosstalk is not None
            r.trace.crosstalk.update(ran=True, turns=list(turns))
            record_drafts(r, self.tokenizer)
