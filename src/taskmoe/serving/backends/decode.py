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
gone, deadline passed), so it never costs another forward. It reuses the loop's own prefill and
per-row sampling (``inference.generate._prefill`` / ``_draw``), so a row decoded in a
``RowBatch`` equals ``generate`` on that row alone with its seed (tested), whoever joins or leaves.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from taskmoe.inference.generate import MIN_TEMPERATURE, GenerationConfig, _Batch, _draw, _prefill, generate_rows
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
    """A row inside a :class:`RowBatch`: its settings, own generator and tokens so far."""

    row: Row
    cfg: GenerationConfig
    generator: torch.Generator
    seed: int
    joined_with: int
    tokens: list[int] = field(default_factory=list)

    def result(self, finish: FinishReason) -> RowResult:
        return RowResult(self.tokens, finish, {"seed": self.seed, "batch_rows": self.joined_with})


class RowBatch:
    """Rows of one model decoding together, joining between steps (see the module docstring).

    ``add(rows) -> handles``; ``step() -> [(handle, RowResult)]`` for the rows that ended in this
    step; ``drop(handles)`` removes rows at once (their results, finish ``"halted"``). Not
    thread-safe: one thread drives a batch.
    """

    def __init__(self, model: nn.Module, stop_ids: Sequence[int] = ()) -> None:
        self.model = model.eval()
        self.stop_ids = sorted({int(s) for s in stop_ids})
        self._stops = frozenset(self.stop_ids)
        self.device = next(model.parameters()).device
        self._live: dict[int, _Live] = {}
        self._batch: _Batch | None = None
        self._handles = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, rows: Sequence[Row]) -> list[int]:
        """Prefill ``rows`` and join them to the running batch; returns one handle per row."""
        handles = [next(self._handles) for _ in rows]
        for h, r in zip(handles, rows):
            seed = row_seed(r)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._live[h] = _Live(r, row_config(r, self.stop_ids, seed), gen, seed, len(rows))
        new = _prefill(self.model, {h: r.prompt_ids for h, r in zip(handles, rows)}, handles, self.device)
        b = self._batch
        if b is None:
            self._batch = new
        else:
            self._batch = _Batch(b.rows + new.rows, type(b.state).cat([b.state, new.state]),
                                 torch.cat([b.logits, new.logits]), torch.cat([b.seen, new.seen]))  # (B + b, ...)
        return handles

    def drop(self, handles: Sequence[int]) -> list[tuple[int, RowResult]]:
        """Remove rows now (cancelled or past their deadline): they cost no further forward."""
        gone = [h for h in handles if h in self._live]
        if gone:
            self._keep([j for j, h in enumerate(self._batch.rows) if h not in set(gone)])  # type: ignore[union-attr]
        return [(h, self._live.pop(h).result("halted")) for h in gone]

    def step(self) -> list[tuple[int, RowResult]]:
        """One token for every row, then one forward for the rows that go on."""
        b = self._batch
        if b is None:
            return []
        with torch.inference_mode():
            tokens = _draw(b, {h: self._live[h].cfg for h in b.rows},
                           {h: self._live[h].generator for h in b.rows})  # (B,)
        ended: list[tuple[int, FinishReason]] = []
        keep: list[int] = []
        for j, (h, tok) in enumerate(zip(b.rows, tokens.tolist())):
            live = self._live[h]
            if tok in self._stops:
                ended.append((h, "eos"))
                continue
            live.tokens.append(tok)
            if not live.row.emit(tok):
                ended.append((h, "halted"))
            elif len(live.tokens) >= live.cfg.max_new_tokens:
                ended.append((h, "length"))
            else:
                keep.append(j)
        self._keep(keep, tokens)
        return [(h, self._live.pop(h).result(f)) for h, f in ended]

    def _keep(self, keep: list[int], tokens: torch.Tensor | None = None) -> None:
        """Keep batch rows ``keep``; with ``tokens`` (the step's draws) also run the next forward."""
        b = self._batch
        assert b is not None
        if not keep:
            self._batch = None
            return
        with torch.inference_mode():
            if len(keep) < len(b.rows):
                sel = torch.tensor(keep, dtype=torch.long, device=self.device)  # (B',)
                b.rows = [b.rows[j] for j in keep]
                b.state, b.logits, b.seen = b.state.select(sel), b.logits[sel], b.seen[sel]
                if tokens is not None:
                    tokens = tokens[sel]
            if tokens is not None:
                b.seen[torch.arange(len(tokens), device=self.device), tokens] = True
                out = self.model(tokens.unsqueeze(1), b.state, logits_to_keep=1)
                b.state, b.logits = out.state, out.logits[:, -1]  # (B, V)
