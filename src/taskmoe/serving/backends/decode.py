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
"""

from __future__ import annotations

import secrets
from typing import Sequence

from torch import nn

from taskmoe.inference.generate import MIN_TEMPERATURE, GenerationConfig, generate_rows
from taskmoe.serving.backend import FinishReason, Row, RowResult

__all__ = ["MIN_TEMPERATURE", "row_seed", "row_config", "decode_rows"]

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
