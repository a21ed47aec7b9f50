"""Row-controlled batched decoding for a serving backend: serving ``Row``s mapped onto the one loop.

A server batch mixes rows of different requests. :func:`taskmoe.inference.generate.generate_rows`
already decodes with per-row configs, per-row generators and a per-row halt callback, so this
module only translates:

- ``Row.params`` (``max_tokens``, ``temperature``, ``top_p``, ``seed``) -> one
  :class:`~taskmoe.inference.generate.GenerationConfig` per row, with the backend's stop ids;
- the row's seed (or a fresh random one, reported in the trace) -> the row's **own**
  ``torch.Generator``, so a row's tokens do not depend on its batch-mates (tested: every row
  equals ``inference.generate`` run on that row alone with the row's settings and seed);
- ``Row.emit(token)`` -> the row's halt callback: False (stop sequence, client gone, deadline)
  drops the row at once;
- the loop's finish reasons -> serving's (``stop`` -> ``eos``).

Numerical guarantees come from the loop and :mod:`taskmoe.inference.sampling`: a temperature below
:data:`MIN_TEMPERATURE` decodes greedily (tiny T would overflow ``logits / T``); logits are shifted
by the row max before the temperature; top-p always keeps the most likely token (a ``top_p`` that
rounds to 0 in float32, e.g. 5e-324, found by schemathesis, still draws a valid token). Finished
rows leave the batch and ragged prompts are prefilled exactly, as in ``inference.generate``.

Continuous batching: :class:`RowBatch` is the same loop opened up so the scheduler can drive it a
step at a time. New rows **join between steps** (their prompts are prefilled in equal-length
groups and their states concatenated onto the running batch: KV caches keep per-row lengths, so
rows at different positions decode together exactly), every step draws one token per row and runs
one forward for the rows that go on, and a row leaves the moment it ends or is dropped (client
gone, deadline passed), so it never costs another forward. It is serving's view of
:class:`~taskmoe.inference.session.DecodeSession` (the loop's own prefill and per-row sampling,
opened up; the IMoE pipeline's decode stages use the same session), so a row decoded in a
``RowBatch`` equals ``generate`` on that row alone with its seed (tested), whoever joins or leaves.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from taskmoe.inference.generate import MIN_TEMPERATURE, GenerationConfig, RowOutput, generate_rows
from taskmoe.inference.session import DecodeSession
from taskmoe.serving.backend import FinishReason, Row, RowResult

__all__ = ["MIN_TEMPERATURE", "row_seed", "row_config", "decode_rows", "RowBatch"]

_FINISH: dict[str, FinishReason] = {"stop": "eos", "length": "length", "halted": "halted"}


def row_seed(row: Row) -> int:
    """The row's seed, or a fresh random one (reported in the row's trace)."""
    return row.params.seed if row.params.seed is not None else secrets.randbits(63)


def row_config(row: Row, stop_ids: Sequence[int], seed: int) -> GenerationConfig:
    """The generation config of one serving row."""
    p = row.params
    return GenerationConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                            stop_tokens=sorted({int(s) for s in stop_ids}), seed=seed)


def decode_rows(model: nn.Module, rows: Sequence[Row], stop_ids: Sequence[int] = ()) -> list[RowResult]:
    """Generate every row of one batch; see the module docstring. Stop ids are not emitted."""
    if not rows:
        return []
    seeds = [row_seed(r) for r in rows]
    cfgs = [row_config(r, stop_ids, s) for r, s in zip(rows, seeds)]
    # generators=None: each row draws from its own generator seeded with its config's seed
    outs = generate_rows(model, [r.prompt_ids for r in rows], cfgs, emits=[r.emit for r in rows])
    return [RowResult(o.tokens, _FINISH[o.finish], {"seed": s, "batch_rows": len(rows)}) for o, s in zip(outs, seeds)]


@dataclass
class _Live:
    """A row inside a :class:`RowBatch`: its seed and how many rows joined with it."""

    seed: int
    joined_with: int

    def result(self, out: RowOutput) -> RowResult:
        return RowResult(out.tokens, _FINISH[out.finish], {"seed": self.seed, "batch_rows": self.joined_with})


class RowBatch:
    """Rows of one model decoding together, joining between steps (see the module docstring).

    ``add(rows) -> handles``; ``step() -> [(handle, RowResult)]`` for the rows that ended in this
    step; ``drop(handles)`` removes rows at once (their results, finish ``"halted"``). Serving's
    view of :class:`~taskmoe.inference.session.DecodeSession`. Not thread-safe: one thread drives a batch.
    """

    def __init__(self, model: nn.Module, stop_ids: Sequence[int] = ()) -> None:
        self.session = DecodeSession(model)
        self.stop_ids = sorted({int(s) for s in stop_ids})
        self._live: dict[int, _Live] = {}

    def __len__(self) -> int:
        return len(self.session)

    def add(self, rows: Sequence[Row]) -> list[int]:
        """Prefill ``rows`` and join them to the running batch; returns one handle per row."""
        seeds = [row_seed(r) for r in rows]
        device = self.session.device
        handles = self.session.add([r.prompt_ids for r in rows], [row_config(r, self.stop_ids, s) for r, s in zip(rows, seeds)],
                                   generators=[torch.Generator(device=device).manual_seed(s) for s in seeds],
                                   emits=[r.emit for r in rows])
        for h, s in zip(handles, seeds):
            self._live[h] = _Live(s, len(rows))
        return handles

    def drop(self, handles: Sequence[int]) -> list[tuple[int, RowResult]]:
        """Remove rows now (cancelled or past their deadline): they cost no further forward."""
        return [(h, self._live.pop(h).result(o)) for h, o in self.session.drop(handles)]

    def step(self) -> list[tuple[int, RowResult]]:
        """One token for every row, then one forward for the rows that go on."""
        return [(h, self._live.pop(h).result(o)) for h, o in self.session.step()]
