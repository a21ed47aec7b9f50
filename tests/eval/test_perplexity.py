"""Held-out perplexity: which tokens are scored (hand-built windows), exact values for models with
known probabilities, the mixture's value by hand, and routing that sees only the prefix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from taskmoe.errors import ConfigError, DataError
from taskmoe.eval.perplexity import IGNORE, build_windows, perplexity, perplexity_matrix, route_prefixes, routed_perplexity
from taskmoe.router.policy import RoutingDecision

V, BOS, EOS, PAD = 10, 1, 2, 0


def test_windows_hand_built() -> None:
    # seq = [bos 5 6 7 8 eos]; T = 3 -> windows [1 5 6 | 7] and [7 8 2]; the prefix (5) is not scored
    w = build_windows([[5, 6, 7, 8]], ["d"], seq_len=3, bos_id=BOS, eos_id=EOS, pad_id=PAD, route_tokens=1)
    assert w.input_ids.tolist() == [[1, 5, 6], [7, 8, PAD]]
    assert w.targets.tolist() == [[IGNORE, 6, 7], [8, 2, IGNORE]]
    assert w.doc.tolist() == [0, 0] and w.prefixes == [[5]] and w.tokens == 4
    # a cut document has no eos; a document with nothing after its prefix is skipped
    w = build_windows([[5, 6, 7, 8], [3]], ["a", "b"], seq_len=8, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                      route_tokens=2, max_doc_tokens=3)
    assert w.skipped == 1 and w.n_docs == 1 and w.domains == ["a"]
    assert w.input_ids.tolist() == [[1, 5, 6] + [PAD] * 5] and w.targets.tolist() == [[IGNORE, IGNORE, 7] + [IGNORE] * 5]
    with pytest.raises(DataError, match="no document has tokens to score"):
        build_windows([[5]], ["a"], seq_len=4, bos_id=BOS, eos_id=EOS, pad_id=PAD, route_tokens=2)


class Table(nn.Module):
    """logits[t] = log P[prev token]: a bigram model with known probabilities."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logp = nn.Parameter(probs.log())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logp[ids]  # (B, T, V)


def _uniform() -> Table:
    return Table(torch.full((V, V), 1 / V))


def _peaked(correct: float) -> Table:
    """Predicts ``prev + 1`` with probability ``correct`` and spreads the rest evenly."""
    p = torch.full((V, V), (1 - correct) / (V - 1))
    p[torch.arange(V), (torch.arange(V) + 1) % V] = correct
    return Table(p)


def _docs() -> tuple[list[list[int]], list[str]]:
    # "count" documents follow prev + 1 (mod V); "noise" documents do not
    return [[3, 4, 5, 6, 7], [5, 6, 7, 8, 9, 0], [4, 4, 4, 4, 4]], ["count", "count", "noise"]


def test_perplexity_exact_values() -> None:
    docs, doms = _docs()
    w = build_windows(docs, doms, seq_len=4, bos_id=BOS, eos_id=EOS, pad_id=PAD, route_tokens=1)
    assert perplexity(_uniform(), w) == pytest.approx({"count": V, "noise": V, "all": V})
    # the peaked model: "count" targets after the prefix are all prev+1 except the final eos
    ppl = perplexity(_peaked(0.9), w)
    miss = 0.1 / (V - 1)
    # count docs after the 1-token prefix: 4,5,6,7 hit, eos misses; 6,7,8,9,0 hit, eos misses
    assert ppl["count"] == pytest.approx(math.exp(-(9 * math.log(0.9) + 2 * math.log(miss)) / 11))
    assert ppl["noise"] == pytest.approx(1 / miss)  # 4,4,4,4 then eos: never prev+1
    assert ppl["all"] == pytest.approx(math.exp(-(9 * math.log(0.9) + 7 * math.log(miss)) / 16))
    rows = perplexity_matrix({"u": _uniform(), "p": _peaked(0.9)}, w)
    assert [r["model"] for r in rows] == ["u", "p"] and rows[1]["count"] == pytest.approx(ppl["count"])


class _PrefixRouter:
    categories = ["u", "p"]

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def route_batch(self, seqs):
        self.seen += [list(s) for s in seqs]
        return [RoutingDecision([0.25, 0.75], 0.0, 0.3, [1, 0], [0.75, 0.25], False, None, self.categories)
                if s[0] != 4 else RoutingDecision([0.9, 0.1], 0.0, 0.3, [0], [1.0], False, None, self.categories)
                for s in seqs]


def test_routed_mixture_by_hand_and_prefix_only_routing() -> None:
    docs, doms = _docs()
    w = build_windows(docs, doms, seq_len=4, bos_id=BOS, eos_id=EOS, pad_id=PAD, route_tokens=2)
    r = _PrefixRouter()
    dec = route_prefixes(r, w)
    assert r.seen == [[3, 4], [5, 6], [4, 4]]  # the router saw the prefixes, nothing else
    experts = {"u": _uniform(), "p": _peaked(0.9)}
    out = routed_perplexity(dec, r.categories, experts, w, mode="routed")
    miss = 0.1 / (V - 1)
    hit_mix, miss_mix = 0.75 * 0.9 + 0.25 / V, 0.75 * miss + 0.25 / V
    # count docs after a 2-token prefix: 5,6,7 + eos ; 7,8,9,0 + eos -> 7 hits, 2 misses under the mixture
    assert out["count"] == pytest.approx(math.exp(-(7 * math.log(hit_mix) + 2 * math.log(miss_mix)) / 9))
    assert out["noise"] == pytest.approx(V)  # routed to "u" alone
    top1 = routed_perplexity(dec, r.categories, experts, w, mode="top1")
    assert top1["count"] == pytest.approx(perplexity(experts["p"], w)["count"])
    # a category without an expert: its weight goes to the others (here all to "p")
    only_p = routed_perplexity(dec, r.categories, {"p": experts["p"]}, w)
    assert only_p["all"] == pytest.approx(perplexity(experts["p"], w)["all"])
    with pytest.raises(ConfigError, match="routing decisions"):
        routed_perplexity(dec[:1], r.categories, experts, w)
