"""Pruning wired into joint training on the shared loop: a routed mixture of real expert_lm experts is
fine-tuned; a planted never-selected expert is pruned when its first window of 10 feed-forwards (sequences:
5 steps of batch 2) closes, an all-contributing set loses nobody, and a resumed run keeps the decision."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from taskmoe.experts.ensemble import RoutedMixture
from taskmoe.experts.expert_lm import build_expert, expert_config
from taskmoe.experts.pruning import PruningConfig
from taskmoe.models.config import ConvConfig, ExpertLMConfig, LinearAttentionConfig
from taskmoe.training.config import TrainConfig
from taskmoe.training.recipes.mixture import MixtureWindows, train_joint

V, D, T = 40, 16, 12
NAMES = ["a", "b", "ghost"]


def _mixture() -> RoutedMixture:
    torch.manual_seed(0)
    shared = nn.Embedding(V, D)
    with torch.no_grad():
        shared.weight.mul_(D**-0.5)  # unit-norm rows, like the router's rescaled table
    cfg = expert_config(shared, ExpertLMConfig(n_layers=2, n_heads=2, conv=ConvConfig(levels=2),
                                                     attention=LinearAttentionConfig(chunk_size=8)))
    return RoutedMixture({n: build_expert(cfg, shared) for n in NAMES})


def _data(weights: list[list[float]]) -> MixtureWindows:
    g = torch.Generator().manual_seed(1)
    n = len(weights)
    windows = [(torch.arange(T + 1) * (i % 5 + 1) + i) % V for i in range(n)]  # learnable arithmetic rows
    conf = torch.full((n, 3), 1 / 3) + 0.01 * torch.rand(n, 3, generator=g)
    return MixtureWindows(windows, torch.tensor(weights), conf / conf.sum(1, keepdim=True))


def _cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=2, lr=1e-2, warmup_steps=0, progress=False, **kw)


def test_planted_never_selected_expert_is_pruned_in_joint_training() -> None:
    mix = _mixture()
    ghost_before = {k: v.clone() for k, v in mix.experts["ghost"].state_dict().items()}
    data = _data([[0.8, 0.2, 0.0], [0.3, 0.7, 0.0]] * 8)  # ghost never gets weight
    res, cb = train_joint(mix, data, _cfg(14), pruning=PruningConfig(window=10, min_contributions=3))
    assert res.steps == 14 and sum(res.losses[-3:]) < sum(res.losses[:3])
    assert mix.pruned == ["ghost"] and cb.tracker.pruned == ["ghost"]
    assert cb.events == [{"step": 5, "window": 0, "pruned": ["ghost"], "counts": {"a": 10, "b": 10, "ghost": 0}}]
    assert cb.tracker.seen == 28  # one feed-forward per sequence (14 steps x 2 rows), evaluation not counted
    for k, v in mix.experts["ghost"].state_dict().items():
        assert torch.equal(v, ghost_before[k]), k


def test_all_contributing_experts_are_kept() -> None:
    mix = _mixture()
    # batch_size 2 reads shuffled rows; every row gives ghost some weight, so each sequence counts it
    data = _data([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.1, 0.6, 0.3]] * 6)
    res, cb = train_joint(mix, data, _cfg(20), pruning=PruningConfig(window=10, min_contributions=3))
    assert mix.pruned == [] and cb.events == []
    assert [h.pruned for h in cb.tracker.history] == [[], [], [], []]  # 40 sequences: 4 windows
    assert all(c == 10 for h in cb.tracker.history for c in h.counts.values())


def test_resume_restores_counts_and_reapplies_pruning(tmp_path: Path) -> None:
    data = _data([[0.8, 0.2, 0.0], [0.3, 0.7, 0.0]] * 8)
    prune = PruningConfig(window=10, min_contributions=3)
    first = _mixture()
    train_joint(first, data, _cfg(12, save_every=12), pruning=prune, out_dir=tmp_path)
    fresh = _mixture()
    assert fresh.pruned == []
    res, cb = train_joint(fresh, data, _cfg(16, save_every=4), pruning=prune, out_dir=tmp_path)
    assert fresh.pruned == ["ghost"]  # re-applied from the checkpointed callback state
    assert cb.tracker.seen == 32 and res.steps == 16 and len(cb.events) == 1


def _union_worker(rank: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    from taskmoe.experts.pruning import ContributionTracker, PruningCallback

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cb = PruningCallback(ContributionTracker(["a", "b", "c"], PruningConfig(window=4, min_contributions=1)))
        # rank 0's rows use only a, rank 1's only b: each process alone would prune the other's expert
        assert cb.observe([{"a": 1.0}] if rank == 0 else [{"b": 1.0}]) == []  # 2 of the window's 4 sequences
        (ev,) = cb.observe([{"a": 0.5}] if rank == 0 else [{"b": 0.5}])
        Path(out, f"{rank}.json").write_text(json.dumps({"counts": ev.counts, "pruned": ev.pruned}))
    finally:
        dist.destroy_process_group()


def test_pruning_decisions_agree_across_ddp_processes(tmp_path: Path) -> None:
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_union_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == {"counts": {"a": 2, "b": 2, "c": 0}, "pruned": ["c"]}
