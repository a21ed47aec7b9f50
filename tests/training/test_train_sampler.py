"""The deterministic sampler: order, sharding across ranks, resume from a position."""

from __future__ import annotations

import pytest
import torch

from taskmoe.errors import DataError
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train
from taskmoe.training.sampler import BatchPlan, DataPosition, epoch_permutation, iterate_steps, resolve_collate
from train_helpers import AffineSequences, TinyLM, lm_loss


class Indices:
    """A dataset whose samples are their own indices (so batches show what was read)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _take(plan: BatchPlan, rank: int, start: DataPosition, steps: int):
    it = iterate_steps(Indices(plan.num_samples), lambda s: list(s), plan, rank, start)
    return [next(it) for _ in range(steps)]


def test_epoch_permutation_is_seeded_by_seed_and_epoch():
    a = epoch_permutation(50, 1, 0)
    assert sorted(a.tolist()) == list(range(50))
    assert (a == epoch_permutation(50, 1, 0)).all()
    assert not (a == epoch_permutation(50, 1, 1)).all() and not (a == epoch_permutation(50, 2, 0)).all()


def test_ranks_together_read_what_one_process_reads():
    single = BatchPlan(30, batch_size=4, grad_accum=2, world_size=1, seed=5)
    two = BatchPlan(30, batch_size=2, grad_accum=2, world_size=2, seed=5)
    s = _take(single, 0, DataPosition(), 5)
    r0, r1 = _take(two, 0, DataPosition(), 5), _take(two, 1, DataPosition(), 5)
    for (sm, spos), (am, apos), (bm, _) in zip(s, r0, r1):
        assert spos == apos
        for m in range(2):  # micro-step m: rank 0 + rank 1 == the single process's micro-batch
            assert am[m] + bm[m] == sm[m]


def test_epochs_drop_the_tail_and_never_repeat_within_an_epoch():
    plan = BatchPlan(10, batch_size=3, grad_accum=1, world_size=1, seed=0)  # 3 steps/epoch, 1 sample dropped
    steps = _take(plan, 0, DataPosition(), 6)
    assert [p for _, p in steps] == [DataPosition(0, 3), DataPosition(0, 6), DataPosition(1, 0),
                                     DataPosition(1, 3), DataPosition(1, 6), DataPosition(2, 0)]  # fmt: skip
    epoch0 = [i for micro, _ in steps[:3] for b in micro for i in b]
    assert len(set(epoch0)) == 9
    assert epoch0 == epoch_permutation(10, 0, 0)[:9].tolist()


def test_iterating_from_a_position_continues_the_same_stream():
    plan = BatchPlan(23, batch_size=2, grad_accum=3, world_size=1, seed=9)
    full = _take(plan, 0, DataPosition(), 9)
    resumed = _take(plan, 0, full[4][1], 4)
    assert resumed == full[5:]


def test_too_small_dataset_and_collate_resolution():
    with pytest.raises(DataError, match="3 samples, fewer than one global batch of 4"):
        BatchPlan(3, batch_size=2, grad_accum=1, world_size=2, seed=0)
    ds = AffineSequences(4)
    assert resolve_collate(ds, None) == ds.collate
    assert resolve_collate(Indices(3), None) is torch.utils.data.default_collate
    own = lambda s: s  # noqa: E731
    assert resolve_collate(ds, own) is own


def test_gradient_accumulation_matches_a_bigger_batch():
    """Same global batch (4 samples per step) as 4x1, 2x2 and 1x4 micro-batches: same updates."""
    data = AffineSequences(24)
    results = []
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        torch.manual_seed(0)
        model = TinyLM(dropout=0.0)
        cfg = TrainConfig(max_steps=6, batch_size=bs, grad_accum=ga, lr=1e-2, warmup_steps=1, progress=False)
        res = train(model, lm_loss, data, cfg)
        results.append((res.losses, model.state_dict()))
    for losses, sd in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-5)
        for k, v in sd.items():
            assert torch.allclose(v, results[0][1][k], atol=1e-5), k
