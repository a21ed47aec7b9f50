"""ExpertStore laziness/LRU/thread-safety and resident memory; pruning by contributions."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from taskmoe.errors import ConfigError
from taskmoe.experts.pruning import ContributionTracker, PruningCallback, PruningConfig
from taskmoe.experts.store import ExpertStore, module_nbytes
from taskmoe.io import load_component, load_state_into, save_component


class Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width, bias=False)


def _save(folder: Path, width: int, seed: int) -> None:
    torch.manual_seed(seed)
    m = Tiny(width)
    save_component(folder, "tiny", {"width": width}, m.state_dict())


def _loader(folder: Path) -> nn.Module:
    comp = load_component(folder, "tiny")
    m = Tiny(comp.config["width"])
    load_state_into(m, comp.weights)
    return m


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_lazy_lru_and_counts(tmp_path: Path) -> None:
    for i in range(4):
        _save(tmp_path / f"e{i}", 8, i)
    store = ExpertStore(_loader, max_experts=2)
    assert store.register_dir(tmp_path) == ["e0", "e1", "e2", "e3"]
    assert store.stats().loads == 0  # nothing read at registration
    a = store.get("e0")
    store.get("e1")
    assert store.get("e0") is a  # hit, and e0 becomes most recent
    store.get("e2")  # evicts e1 (least recently used), not e0
    s = store.stats()
    assert (s.loads, s.hits, s.evictions) == (3, 1, 1)
    assert s.resident == ["e0", "e2"]
    assert s.resident_bytes == 2 * 8 * 8 * 4
    with pytest.raises(KeyError, match="unknown expert"):
        store.get("nope")


def test_byte_budget_and_pin(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"e{i}", 16, i)
    one = 16 * 16 * 4
    store = ExpertStore(_loader, max_bytes=2 * one)
    store.register_dir(tmp_path)
    store.pin("e0")
    store.get("e1")
    store.get("e2")  # over budget: e1 goes, pinned e0 stays
    assert store.stats().resident == ["e0", "e2"]
    with pytest.raises(ConfigError):
        ExpertStore(_loader, max_experts=0)


def test_concurrent_gets_load_once(tmp_path: Path) -> None:
    _save(tmp_path / "e0", 8, 0)
    store = ExpertStore(_loader)
    store.register_dir(tmp_path)
    got: list[nn.Module] = []
    threads = [threading.Thread(target=lambda: got.append(store.get("e0"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.stats().loads == 1
    assert all(m is got[0] for m in got)


def test_resident_memory_grows_by_used_experts_only(tmp_path: Path) -> None:
    width = 1024  # 4 MiB of fp32 weights per expert
    for i in range(16):
        _save(tmp_path / f"e{i:02d}", width, i)
    per_expert = width * width * 4
    store = ExpertStore(_loader)
    store.register_dir(tmp_path)
    before = _rss_bytes()
    store.get("e03")
    store.get("e11")
    grown = _rss_bytes() - before
    assert store.stats().resident_bytes == 2 * per_expert
    # about 2 experts, far from 16 (allow allocator slack of 2 more)
    assert grown < 4 * per_expert, f"RSS grew by {grown / 2**20:.1f} MiB for 2 experts of {per_expert / 2**20:.1f} MiB"


def test_module_nbytes_excludes_shared() -> None:
    emb = nn.Embedding(10, 4)
    m = nn.Sequential(emb, nn.Linear(4, 4, bias=False))
    assert module_nbytes(m) == (40 + 16) * 4
    assert module_nbytes(m, [emb.weight.untyped_storage().data_ptr()]) == 16 * 4


def _planted(n_ghost: int, window: int = 10) -> list[dict[str, float]]:
    """``window`` sequences; the planted expert ``ghost`` is routed to the first ``n_ghost`` of them."""
    return [{"a": 0.6, "ghost": 0.4} if i < n_ghost else {"a": 0.5, "b": 0.5} for i in range(window)]


@pytest.mark.parametrize("batch", [1, 4, 10])
def test_a_planted_expert_that_contributes_2_of_10_times_is_pruned_at_the_windows_end(batch: int) -> None:
    """Per sequence, whatever the batch size: a batch of 4 that used ghost twice counts 2, not 1."""
    cb = PruningCallback(ContributionTracker(["a", "b", "ghost"], PruningConfig(window=10, min_contributions=3)))
    rows = _planted(2)
    closed = []
    for s in range(0, 10, batch):
        assert cb.tracker.pruned == []  # nothing is decided before the window's end
        closed += cb.observe(rows[s : s + batch])
    assert [(e.window_index, e.counts, e.pruned) for e in closed] == [(0, {"a": 10, "b": 8, "ghost": 2}, ["ghost"])]
    assert cb.tracker.active == ["a", "b"] and cb.tracker.counts == {"a": 0, "b": 0}  # counts reset


@pytest.mark.parametrize("batch", [1, 10])
def test_a_planted_expert_that_contributes_3_of_10_times_is_kept(batch: int) -> None:
    cb = PruningCallback(ContributionTracker(["a", "b", "ghost"], PruningConfig(window=10, min_contributions=3)))
    rows = _planted(3)
    closed = [e for s in range(0, 10, batch) for e in cb.observe(rows[s : s + batch])]
    assert [(e.counts, e.pruned) for e in closed] == [({"a": 10, "b": 7, "ghost": 3}, [])]
    # the next window starts from zero: ghost used twice in it is pruned at its end
    closed = cb.observe(_planted(2))
    assert [(e.window_index, e.counts["ghost"], e.pruned) for e in closed] == [(1, 2, ["ghost"])]


def test_a_window_closing_mid_batch_rereads_the_rest_of_the_batch_without_the_pruned_expert() -> None:
    mix_pruned: list[str] = []
    tr = ContributionTracker(["a", "ghost"], PruningConfig(window=4, min_contributions=2))
    cb = PruningCallback(tr, on_prune=mix_pruned.extend)
    rows = [{"a": 1.0}] * 4 + [{"ghost": 1.0}] * 2  # rows 5-6 only read ghost ...
    reread = [{"a": 1.0}] * 6  # ... and fall back to a once ghost is gone (RoutedMixture renormalises)
    closed = cb.observe(rows, lambda: reread)
    assert [e.pruned for e in closed] == [["ghost"]] and mix_pruned == ["ghost"]
    assert tr.seen == 6 and tr.counts == {"a": 2}  # rows 5-6 counted for a, under the new weights


def test_min_weight_and_keep_at_least() -> None:
    tr = ContributionTracker(["a", "b"], PruningConfig(window=2, min_contributions=1, min_weight=0.2, keep_at_least=1))
    tr.record({"a": 0.9, "b": 0.1})
    ev = tr.record({"a": 0.95, "b": 0.05})  # b's weights are below min_weight: no contribution
    assert ev.pruned == ["b"]
    tr2 = ContributionTracker(["a", "b"], PruningConfig(window=1, min_contributions=1, keep_at_least=1))
    ev = tr2.record({})
    assert len(ev.pruned) == 1 and len(tr2.active) == 1  # never below keep_at_least
    alone = PruningCallback(ContributionTracker(["a"], PruningConfig(window=1, min_contributions=1, keep_at_least=0)))
    alone.observe([{}])
    assert alone.tracker.pruned == ["a"] and alone.on_step_end(1, {}) is True  # nothing left to train: stop
