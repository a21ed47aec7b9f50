"""The decoding loop opened up for continuous batching: :class:`DecodeSession` (rows join between steps).

:func:`taskmoe.inference.generate.stream_rows` runs one fixed list of rows to the end. A session
is the same loop driven from outside, one step at a time, so rows of later callers can **join
between steps** (a server's new requests, a pipeline's rows that just finished their drafts):

- ``add(prompts, cfgs, generators=, emits=, side=) -> handles``: the new rows' prompts are
  prefilled exactly as the loop prefills (:func:`~taskmoe.inference.generate._prefill`: equal
  lengths together, side data into the state) and their states are concatenated onto the running
  batch (KV caches keep per-row lengths, so rows at different positions decode together exactly);
- ``step() -> [(handle, RowOutput)]``: one token for every row (the loop's own per-row sampling,
  :func:`~taskmoe.inference.generate._draw`), then ONE forward for the rows that go on; returns
  the rows that ended in this step (stop token, ``max_new_tokens``, or their ``emit`` said False);
- ``drop(handles)``: rows leave now (finish ``"halted"``, keeping their tokens) and cost no
  further forward.

Exactness: a row's tokens depend only on its prompt, config, generator and side data, never on
who joins or leaves (same arguments as the loop's: row-independent models, per-row generators),
so a row decoded in a session equals :func:`~taskmoe.inference.generate.generate_rows` on that
row alone (tested here and in serving). ``generators=None`` gives each row its own generator
seeded from ``cfg.seed`` (the global RNG when that is None), as the loop does. A row with
``max_new_tokens == 0`` ends at the next step with no tokens (finish ``"length"``).

Not thread-safe: one thread drives a session.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from taskmoe.inference.generate import Emit, GenerationConfig, RowOutput, _Batch, _check_per_row, _check_prompts, _draw, _prefill

__all__ = ["DecodeSession"]


@dataclass
class _Slot:
    """One row of a session: its config, generator, token callback and tokens so far."""

    cfg: GenerationConfig
    generator: torch.Generator | None
    emit: Emit | None
    stops: frozenset[int]
    tokens: list[int] = field(default_factory=list)


class DecodeSession:
    """Rows of one model decoding together, joining between steps (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self._slots: dict[int, _Slot] = {}
        self._batch: _Batch | None = None
        self._ended: list[tuple[int, RowOutput]] = []  # rows with nothing to decode, reported at the next step
        self._handles = itertools.count()
        self.steps = 0
        """Decode steps run so far (each one forward for every live row)."""

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, prompts: Sequence[Sequence[int]], cfgs: Sequence[GenerationConfig], *,
            generators: Sequence[torch.Generator | None] | None = None, emits: Sequence[Emit | None] | None = None,
            side: Sequence[Any] | None = None) -> list[int]:
        """Prefill ``prompts`` and join them to the running batch; one handle per row."""
        _check_prompts(list(prompts), self.model.vocab_size)
        _check_per_row(len(prompts), cfgs=cfgs, generators=generators, emits=emits, side=side)
        handles = [next(self._handles) for _ in prompts]
        for i, (h, c) in enumerate(zip(handles, cfgs)):
            gen = generators[i] if generators is not None else (
                None if c.seed is None else torch.Generator(device=self.device).manual_seed(c.seed))
            self._slots[h] = _Slot(c, gen, None if emits is None else emits[i], frozenset(c.stop_tokens))
        todo = [j for j, c in enumerate(cfgs) if c.max_new_tokens > 0]
        self._ended += [(handles[j], RowOutput([], "length")) for j, c in enumerate(cfgs) if c.max_new_tokens == 0]
        for h, _ in self._ended:
            self._slots.pop(h, None)
        if not todo:
            return handles
        by_handle = {handles[j]: list(prompts[j]) for j in todo}
        new = _prefill(self.model, by_handle, list(by_handle), self.device,
                       None if side is None else {handles[j]: side[j] for j in todo})
        b = self._batch
        if b is None:
            self._batch = new
        else:
            self._batch = _Batch(b.rows + new.rows, type(b.state).cat([b.state, new.state]),
                                 torch.cat([b.logits, new.logits]), torch.cat([b.seen, new.seen]))  # (B + b, ...)
        return handles

    def drop(self, handles: Sequence[int]) -> list[tuple[int, RowOutput]]:
        """Remove rows now (finish ``"halted"``, tokens kept): they cost no further forward."""
        gone = {h for h in handles if h in self._slots}
        if gone and self._batch is not None:
            self._keep([j for j, h in enumerate(self._batch.rows) if h not in gone])
        return [(h, RowOutput(self._slots.pop(h).tokens, "halted")) for h in handles if h in gone]

    def step(self) -> list[tuple[int, RowOutput]]:
        """One token for every row, then one forward for the rows that go on; the rows that ended."""
        ended, self._ended = self._ended, []
        b = self._batch
        if b is None:
            return ended
        slots = self._slots
        with torch.inference_mode():
            tokens = _draw(b, {h: slots[h].cfg for h in b.rows}, {h: slots[h].generator for h in b.rows})  # (B,)
        keep: list[int] = []
        for j, (h, tok) in enumerate(zip(b.rows, tokens.tolist())):
            s = slots[h]
            if tok in s.stops:
                ended.append((h, RowOutput(s.tokens, "stop")))
                continue
            s.tokens.append(tok)
            if s.emit is not None and not s.emit(tok):
                ended.append((h, RowOutput(s.tokens, "halted")))
            elif len(s.tokens) >= s.cfg.max_new_tokens:
                ended.append((h, RowOutput(s.tokens, "length")))
            else:
                keep.append(j)
        for h, _ in ended:
            slots.pop(h, None)
        self._keep(keep, tokens)
        self.steps += 1
        return ended

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
