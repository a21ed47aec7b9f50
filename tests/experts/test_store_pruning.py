"""ExpertStore laziness/LRU/thread-safety and resident memory; pruning by contributions."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from taskmoe.errors import ConfigError
from taskmoe.experts.pruning import ContributionTracker, PruningConfig
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


def test_planted_never_selected_expert_is_pruned() -> None:
    tr = ContributionTracker(["a", "b", "ghost"], PruningConfig(window=10, min_contributions=3))
    events = []
    for i in range(10):
        events.append(tr.record([{"a": 0.7, "b": 0.3}] if i % 2 else [{"b": 1.0}, {"a": 0.5, "b": 0.5}]))
    assert events[:9] == [None] * 9
    assert events[9].pruned == ["ghost"]
    assert events[9].counts == {"a": 10, "b": 10, "ghost": 0}
    assert tr.active == ["a", "b"]


def test_all_contribute_none_pruned_and_threshold_boundary() -> None:
    tr = ContributionTracker(["a", "b", "c"], PruningConfig(window=10, min_contributions=3))
    # c contributes exactly 3 times: not fewer than 3, so it stays
    for i in range(10):
        row = {"a": 0.5, "b": 0.5}
        if i < 3:
            row["c"] = 0.2
        ev = tr.record(row)
    assert ev is not None and ev.pruned == [] and tr.active == ["a", "b", "c"]
    # next window: c contributes twice -> pruned; counters were reset
    for i in range(10):
        ev = tr.record({"a": 1.0, "c": 0.1} if i < 2 else {"a": 0.6, "b": 0.4})
    assert ev.pruned == ["c"]


def test_min_weight_and_keep_at_least() -> None:
    tr = ContributionTracker(["a", "b"], PruningConfig(window=2, min_contributions=1, min_weight=0.2, keep_at_least=1))
    tr.record({"a": 0.9, "b": 0.1})
    ev = tr.record({"a": 0.95, "b": 0.05})  # b's weights are below min_weight: no contribution
    assert ev.pruned == ["b"]
    tr2 = ContributionTracker(["a", "b"], PruningConfig(window=1, min_contributions=1, keep_at_least=1))
    ev = tr2.record({})
    assert len(ev.pruned) == 1 and len(tr2.active) == 1  # never below keep_at_least
