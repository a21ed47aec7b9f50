"""Which training documents each expert learns from: the router labels the corpus.

The IMoE seed's rule, per training document (routed once, on its whole text):

- selected by one category -> that category's expert;
- selected by several ("a multi-category document") -> every one of them trains on it;
- selected by none (the router's fallback) -> *all* experts train on it.

An expert that is not in the active set (never trained, or pruned) does not receive documents;
a document whose selected categories are all inactive is treated as a fallback document. Expert
names are the router's category names.

:func:`assign` is the pure rule over routing decisions; :func:`route_documents` routes token-id
sequences in batches (with a progress bar) and applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from taskmoe.errors import ConfigError

__all__ = ["Assignment", "assign", "route_documents"]


class _Decision(Protocol):  # the fields of taskmoe.router.policy.RoutingDecision this module reads
    selected: list[int]
    fallback: bool
    categories: list[str]


@dataclass
class Assignment:
    """Document indices per expert, plus how many documents took each path."""

    experts: list[str]
    docs: dict[str, list[int]]
    total: int
    single: int = 0
    multi: int = 0
    fallback: int = 0
    categories_of: list[list[str]] = field(default_factory=list)
    """For each document, the experts it went to (in routing order; all experts for fallback)."""
    is_fallback: list[bool] = field(default_factory=list)
    """For each document, whether it went to all experts because no active category selected it."""

    def rows(self) -> list[dict[str, Any]]:
        """One row per expert: documents, and how many of them were shared or fallback documents."""
        out = []
        for e in self.experts:
            idx = self.docs[e]
            fb = sum(1 for i in idx if self.is_fallback[i])
            multi = sum(1 for i in idx if not self.is_fallback[i] and len(self.categories_of[i]) > 1)
            out.append({"expert": e, "documents": len(idx), "multi_category": multi, "fallback": fb})
        return out

    def summary(self) -> dict[str, int]:
        return {"documents": self.total, "single": self.single, "multi": self.multi, "fallback": self.fallback}


def assign(decisions: Sequence[_Decision], experts: Sequence[str] | None = None) -> Assignment:
    """Apply the rule of the module docstring to one routing decision per document.

    ``experts``: the active expert names (default: the decisions' categories). Selected category
    indices are mapped to names through ``decision.categories``.
    """
    if experts is None:
        if not decisions:
            raise ConfigError("assign: no decisions and no expert names")
        experts = list(decisions[0].categories)
    experts = list(experts)
    if not experts or len(set(experts)) != len(experts):
        raise ConfigError(f"assign: expert names must be unique and non-empty, got {experts}")
    active = set(experts)
    out = Assignment(experts=experts, docs={e: [] for e in experts}, total=len(decisions))
    for i, d in enumerate(decisions):
        names = [d.categories[c] if c < len(d.categories) else str(c) for c in d.selected]
        chosen = [n for n in names if n in active] if not d.fallback else []
        is_fb = not chosen
        if is_fb:
            chosen = list(experts)
            out.fallback += 1
        elif len(chosen) > 1:
            out.multi += 1
        else:
            out.single += 1
        for n in chosen:
            out.docs[n].append(i)
        out.categories_of.append(chosen)
        out.is_fallback.append(is_fb)
    return out


def route_documents(router: Any, seqs: Sequence[Sequence[int]], experts: Sequence[str] | None = None, *,
                    batch_size: int = 256, progress: bool = False) -> tuple[Assignment, list[Any]]:
    """Route ``seqs`` with ``router.route_batch`` in batches and :func:`assign` them.

    Returns the assignment and the decisions (one per sequence, in order).
    """
    from taskmoe.progress import progress_bar

    decisions: list[Any] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("routing documents", total=len(seqs))
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            decisions.extend(router.route_batch(chunk))
            bar.advance(task, len(chunk))
    return assign(decisions, experts if experts is not None else list(router.categories)), decisions
