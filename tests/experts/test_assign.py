"""The corpus-labelling rule: one category -> its expert, several -> each, none (fallback) -> all."""

from __future__ import annotations

import pytest

from taskmoe.errors import ConfigError
from taskmoe.experts.assign import assign, route_documents
from taskmoe.router.policy import RoutingDecision

CATS = ["legal", "code", "chat"]


def _d(selected: list[int], fallback: bool = False) -> RoutingDecision:
    w = [1.0 / len(selected)] * len(selected) if selected else []
    return RoutingDecision([0.4, 0.35, 0.25], 0.0, 0.3, selected, w, fallback, None, CATS)


def test_single_multi_and_fallback_documents() -> None:
    decisions = [_d([0]), _d([1, 2]), _d([0, 1, 2], fallback=True), _d([2]), _d([2, 0])]
    a = assign(decisions)
    assert a.docs == {"legal": [0, 2, 4], "code": [1, 2], "chat": [1, 2, 3, 4]}
    assert a.summary() == {"documents": 5, "single": 2, "multi": 2, "fallback": 1}
    assert a.categories_of[4] == ["chat", "legal"] and a.is_fallback == [False, False, True, False, False]
    assert a.rows() == [
        {"expert": "legal", "documents": 3, "multi_category": 1, "fallback": 1},
        {"expert": "code", "documents": 2, "multi_category": 1, "fallback": 1},
        {"expert": "chat", "documents": 4, "multi_category": 2, "fallback": 1},
    ]


def test_inactive_categories_fall_back_to_the_active_experts() -> None:
    # "code" is pruned / not trained: a document routed only to it goes to every active expert
    a = assign([_d([1]), _d([1, 2]), _d([0])], experts=["legal", "chat"])
    assert a.docs == {"legal": [0, 2], "chat": [0, 1]}
    assert a.is_fallback == [True, False, False] and a.summary()["fallback"] == 1
    with pytest.raises(ConfigError, match="unique"):
        assign([_d([0])], experts=["a", "a"])


class _StubRouter:
    categories = CATS

    def __init__(self) -> None:
        self.batches: list[int] = []

    def route_batch(self, seqs):
        self.batches.append(len(seqs))
        return [_d([len(s) % 3]) for s in seqs]


def test_route_documents_batches_in_order() -> None:
    r = _StubRouter()
    seqs = [[1] * n for n in range(1, 8)]  # lengths 1..7 -> categories 1,2,0,1,2,0,1
    a, decisions = route_documents(r, seqs, batch_size=3)
    assert r.batches == [3, 3, 1] and len(decisions) == 7
    assert a.docs == {"legal": [2, 5], "code": [0, 3, 6], "chat": [1, 4]}
