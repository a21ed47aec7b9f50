"""Deterministic, resumable, rank-sharded data order for the train loop.

The loop does not use a shuffling ``DataLoader``/``DistributedSampler`` pair; it owns the order
so a checkpoint can store *where* it is and resume exactly:

- **Order.** Epoch ``e`` visits the samples in ``permutation(N, seed, e)`` (numpy's PCG64
  seeded by ``[seed, e]``: the same on every process, platform and run).
- **Position.** ``DataPosition(epoch, index)``: ``index`` samples of epoch ``epoch``'s
  permutation have been consumed by all processes together. It is all a checkpoint needs.
- **Steps and shards.** One optimizer step takes the next ``G = B * A * W`` samples of the
  permutation (``B`` micro-batch per process, ``A`` accumulation steps, ``W`` processes).
  Micro-step ``m`` of rank ``r`` reads ``block[m*W*B + r*B : m*W*B + (r+1)*B]``, so at each
  micro-step the ``W`` ranks together read the same ``W*B`` samples a single process with
  micro-batch ``W*B`` would: DDP and single-process runs see identical data per update.
- **Epoch tail.** The last ``N mod G`` samples of a permutation are skipped (like
  ``drop_last``); the next epoch reshuffles, so every sample is still seen over epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from taskmoe.errors import DataError


@dataclass(frozen=True)
class DataPosition:
    """How far training has read: ``index`` samples into epoch ``epoch``'s permutation."""

    epoch: int = 0
    index: int = 0


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation of ``range(num_samples)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


@dataclass(frozen=True)
class BatchPlan:
    """Which sample indices each rank reads at each micro-step (see module docstring)."""

    num_samples: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_samples < self.global_batch:
            raise DataError(
                f"training data has {self.num_samples} samples, fewer than one global batch of "
                f"{self.global_batch} (batch_size {self.batch_size} x grad_accum {self.grad_accum} "
                f"x {self.world_size} process(es)); lower batch_size/grad_accum or add data"
            )

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all processes: ``B * A * W``."""
        return self.batch_size * self.grad_accum * self.world_size

    def steps_left(self, pos: DataPosition) -> int:
        """Full optimizer steps still available in ``pos.epoch`` from ``pos.index``."""
        return max(0, (self.num_samples - pos.index) // self.global_batch)

    def advance(self, pos: DataPosition) -> DataPosition:
        """The position after one more optimizer step (wrapping into the next epoch)."""
        nxt = DataPosition(pos.epoch, pos.index + self.global_batch)
        return nxt if self.steps_left(nxt) > 0 else DataPosition(pos.epoch + 1, 0)

    def micro_indices(self, order: Sequence[int], start: int, rank: int) -> list[list[int]]:
        """The ``A`` micro-batches (lists of sample indices) of ``rank`` for the step at ``start``."""
        B, W = self.batch_size, self.world_size
        block = order[start : start + self.global_batch]
        return [[int(i) for i in block[m * W * B + rank * B : m * W * B + (rank + 1) * B]] for m in range(self.grad_accum)]


class _RankBatches(Sampler[list[int]]):
    """Micro-batches of one rank, from a position to the end of that position's epoch."""

    def __init__(self, plan: BatchPlan, rank: int, pos: DataPosition) -> None:
        self.plan, self.rank, self.pos = plan, rank, pos
        self.order = epoch_permutation(plan.num_samples, plan.seed, pos.epoch)

    def __len__(self) -> int:
        return self.plan.steps_left(self.pos) * self.plan.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.plan.steps_left(self.pos)):
            yield from self.plan.micro_indices(self.order, self.pos.index + s * self.plan.global_batch, self.rank)


def resolve_collate(dataset: Any, collate_fn: Callable[[list[Any]], Any] | None) -> Callable[[list[Any]], Any]:
    """The collate function: the explicit one, else ``dataset.collate``, else torch's default."""
    if collate_fn is not None:
        return collate_fn
    return getattr(dataset, "collate", None) or default_collate


def iterate_steps(
    dataset: Any,
    collate: Callable[[list[Any]], Any],
    plan: BatchPlan,
    rank: int,
    start: DataPosition,
    num_workers: int = 0,
) -> Iterator[tuple[list[Any], DataPosition]]:
    """Yield ``(micro_batches, position_after)`` per optimizer step, forever, from ``start``.

    ``micro_batches`` is the list of ``grad_accum`` collated batches of this rank. A fresh
    ``DataLoader`` is built per epoch (and on resume) with its own seeded generator, so loading
    never draws from the global torch RNG (that would break exact resume of dropout etc.).
    """
    pos = start
    while True:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([plan.seed, pos.epoch, 1]).integers(2**62)))
        loader = DataLoader(
            dataset, batch_sampler=_RankBatches(plan, rank, pos), collate_fn=collate, num_workers=num_workers, generator=gen
        )
        it = iter(loader)
        for _ in range(plan.steps_left(pos)):
            micro = [next(it) for _ in range(plan.grad_accum)]
            pos = plan.advance(pos)
            yield micro, pos
        if pos.index != 0:  # position was mid-tail (global batch changed on resume): next epoch
            pos = DataPosition(pos.epoch + 1, 0)
