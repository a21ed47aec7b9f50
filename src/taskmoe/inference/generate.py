"""The one batched autoregressive decoding loop over token ids, with streaming and per-row control.

``generate(model, prompts, cfg)`` returns one list of new token ids per prompt and ``stream(...)``
yields ``(row, token)`` pairs as they are produced: one :class:`GenerationConfig` and one
``torch.Generator`` shared by the batch. Both are thin over :func:`stream_rows`, the loop itself,
which takes **per-row** configs (``max_new_tokens``, sampling settings, stop tokens, seed), per-row
generators, an optional per-row ``emit(token) -> bool`` callback that halts its row by returning
False, and optional per-row **side data** (``side``); :func:`generate_rows` collects it into
:class:`RowOutput` (tokens + why the row ended).
Serving (:mod:`taskmoe.serving.backends.decode`) is an adapter over :func:`generate_rows`.
The model is anything with ``init_state(batch_size)`` and ``forward(ids, state, logits_to_keep=1)
-> LMOutput`` whose state supports ``cat``/``select`` (every :class:`taskmoe.models.CausalLM`).

Ragged prompts, exactly: left-padding would feed pad tokens into convolution buffers and recurrent
states (and shift positions), so it is not exact. Instead prompts are **prefilled in groups of
equal length** (one batched forward per distinct length, no padding at all), then the groups'
states are concatenated (fixed-size recurrent states stack directly; KV caches keep per-row
lengths and mask the unused slots) and **decoded together**, one token per row per step. (A model
with only attention mixers, ``model.supports_padded_prefill``, is instead prefilled in one
right-padded forward with per-row ``lengths``: exact for causal attention, one weight pass instead
of one per length.) A row
that emits a stop token, reaches its ``max_new_tokens`` or is halted by its ``emit`` is dropped
from the batch (``state.select``), so finished rows cost nothing, and no forward is run for a
token nobody will sample. Greedy results for each row equal running that row alone (tested).

Per-row side data: the loop reorders rows (prefill by length) and drops finished ones, so a model
whose behaviour differs per row (an adapter on some rows, per-row mixture weights: see
:mod:`taskmoe.inference.rowwise`) cannot be told "row i" from outside. With ``side``, each prefill
group's state is built by ``model.init_state(b, side=[side[i] for i in group])``: the side data
enters the decoding state with its rows, and the state's ``select``/``cat`` carry it through every
reordering and drop. Without ``side`` the model is called exactly as before (``init_state(b)``).

Randomness: each step, rows with equal sampling settings that draw from the **same generator
object** are sampled in one :func:`~taskmoe.inference.sampling.sample` call, in batch order (rows
are prefilled in ascending prompt length). So with one shared generator (``generate``/``stream``)
the batch is reproducible given the seed, and with a generator per row (the default of
:func:`stream_rows`: seeded from the row's ``cfg.seed``) a row's tokens do not depend on its
batch-mates: every row equals that row decoded alone with its seed (tested). Greedy rows never
touch a generator. A temperature below :data:`MIN_TEMPERATURE` decodes greedily (its T -> 0 limit):
``logits / T`` overflows float32 for tiny T (e.g. 1e-300) and would NaN the draw.
Stop tokens end a row and are not included in its output.
Model calls run under ``torch.inference_mode``, entered per call and never across a ``yield``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence, TypedDict, Unpack

import torch
from torch import nn

from taskmoe.config import Config, check, check_ints, check_min, check_range, doc
from taskmoe.errors import RequestError
from taskmoe.inference.sampling import repetition_penalty, sample, seen_mask

MIN_TEMPERATURE = 1e-3
"""Below this, decoding is greedy: logits / T would overflow float32 for tiny T (e.g. 1e-300)."""

Emit = Callable[[int], bool]
"""Per-row token callback: called with each emitted token; returning False halts the row."""

Finish = Literal["stop", "length", "halted"]
"""Why a row ended: a stop token, ``max_new_tokens`` reached, or its ``emit`` returned False."""


@dataclass
class GenerationConfig(Config):
    max_new_tokens: int = doc(64, "maximum tokens generated per prompt (a stop token ends a row earlier)")
    temperature: float = doc(1.0, f"softmax temperature; 0 (or below {MIN_TEMPERATURE}) = greedy decoding")
    top_k: int = doc(0, "sample among the k most likely tokens; 0 = no limit")
    top_p: float = doc(1.0, "nucleus sampling mass in (0, 1]; 1 = no limit")
    repetition_penalty: float = doc(1.0, "CTRL repetition penalty (> 1 discourages tokens already seen); 1 = off")
    stop_tokens: list[int] = doc([], "token ids that end a row (not included in the output)")
    seed: int | None = doc(None, "seed of the sampling generator when none is passed; None = nondeterministic")

    def validate(self) -> None:
        check_ints(self, ("max_new_tokens", "top_k"), minimum=0)
        check_min(self, ("temperature",))
        check_range(self, ("top_p",), open_low=True)
        check_min(self, ("repetition_penalty",), strict=True)
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_tokens),
              f"GenerationConfig.stop_tokens must be non-negative integers, got {self.stop_tokens!r}")

    @property
    def greedy(self) -> bool:
        """True when this config decodes by argmax (temperature 0 or below :data:`MIN_TEMPERATURE`)."""
        return self.temperature < MIN_TEMPERATURE


@dataclass
class RowOutput:
    """What one row produced: its new tokens (stop token excluded) and why it ended."""

    tokens: list[int]
    finish: Finish


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not isinstance(prompts, (list, tuple)):
        raise RequestError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise RequestError(f"prompt {i} is empty (generation needs at least one token, e.g. BOS)")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


def _check_per_row(n: int, **per_row: Sequence[object] | None) -> None:
    for name, values in per_row.items():
        if values is not None and len(values) != n:
            raise RequestError(f"{name} must give one entry per prompt: {n} prompts but {len(values)} {name}")


@dataclass
class _Batch:
    rows: list[int]  # original prompt index of each batch row
    state: object
    logits: torch.Tensor  # (B, V): next-token logits of each row
    seen: torch.Tensor  # (B, V) bool, for the repetition penalty


def _prefill(model: nn.Module, prompts: Sequence[Sequence[int]], rows: Sequence[int], device: torch.device,
             side: Sequence[Any] | None = None) -> _Batch:
    """Prefill ``prompts[i] for i in rows`` in groups of equal length (ascending), then concatenate;
    with ``side``, each group's initial state receives its rows' side data."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i in rows:
        groups[len(prompts[i])].append(i)
    if len(groups) > 1 and getattr(model, "supports_padded_prefill", False):
        return _prefill_padded(model, prompts, rows, device, side)
    order, states, logits = [], [], []
    with torch.inference_mode():
        for length in sorted(groups):
            idx = groups[length]
            ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)  # (b, length)
            state = model.init_state(len(idx)) if side is None else model.init_state(len(idx), side=[side[i] for i in idx])
            out = model(ids, state, logits_to_keep=1)
            order += idx
            states.append(out.state)
            logits.append(out.logits[:, -1])  # (b, V)
        state = states[0] if len(states) == 1 else type(states[0]).cat(states)
        vocab = logits[0].shape[-1]
        return _Batch(order, state, torch.cat(logits), seen_mask([prompts[i] for i in order], vocab, device))


def _prefill_padded(model: nn.Module, prompts: Sequence[Sequence[int]], rows: Sequence[int], device: torch.device,
                    side: Sequence[Any] | None = None) -> _Batch:
    """All rows in one right-padded forward, for models that say ``supports_padded_prefill`` (exact:
    attention-only models, see :class:`~taskmoe.models.CausalLM`)."""
    rows = list(rows)
    lengths = torch.tensor([len(prompts[i]) for i in rows], dtype=torch.long, device=device)  # (B,)
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)  # (B, T), 0 = padding
    for j, i in enumerate(rows):
        ids[j, : len(prompts[i])] = torch.tensor(list(prompts[i]), dtype=torch.long)
    with torch.inference_mode():
        state = model.init_state(len(rows)) if side is None else model.init_state(len(rows), side=[side[i] for i in rows])
        out = model(ids, state, logits_to_keep=1, lengths=lengths)
        logits = out.logits[:, -1]  # (B, V)
        return _Batch(rows, out.state, logits, seen_mask([prompts[i] for i in rows], logits.shape[-1], device))


def _draw(batch: _Batch, cfgs: Sequence[GenerationConfig], generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per batch row -> (B,): penalty, then sampling, one call per (settings, generator) group."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for j, row in enumerate(batch.rows):
        c = cfgs[row]
        if c.greedy:  # the generator is irrelevant: all greedy rows with one penalty go together
            groups[("greedy", c.repetition_penalty)].append(j)
        else:
            groups[(c.temperature, c.top_k, c.top_p, c.repetition_penalty, id(generators[row]))].append(j)
    if len(groups) == 1:  # the common shared-config batch: no gather/scatter
        row = batch.rows[0]
        return _sample_group(batch.logits, batch.seen, cfgs[row], generators[row])
    tokens = torch.empty(len(batch.rows), dtype=torch.long, device=batch.logits.device)  # (B,)
    for idx in groups.values():
        sel = torch.tensor(idx, dtype=torch.long, device=batch.logits.device)  # (b,)
        row = batch.rows[idx[0]]
        tokens[sel] = _sample_group(batch.logits[sel], batch.seen[sel], cfgs[row], generators[row])
    return tokens


def _sample_group(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig,
                  generator: torch.Generator | None) -> torch.Tensor:
    logits = repetition_penalty(logits, seen, cfg.repetition_penalty)  # (b, V)
    if cfg.greedy:
        return sample(logits, temperature=0.0)
    return sample(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)  # (b,)


class RowOptions(TypedDict, total=False):
    """The per-row keyword options of :func:`stream_rows` and :func:`generate_rows` (one entry per prompt).

    ``generators[i]``: row ``i``'s sampling generator (absent: seeded from ``cfgs[i].seed``, the
    global RNG when that is None); ``emits[i](token)``: called before a token is yielded, False
    halts the row; ``side[i]``: row ``i``'s side data for the model (module docstring).
    """

    generators: Sequence[torch.Generator | None] | None
    emits: Sequence[Emit | None] | None
    side: Sequence[Any] | None


def _row_options(opts: dict[str, Any]) -> tuple[Any, Any, Any]:
    unknown = sorted(set(opts) - set(RowOptions.__annotations__))
    if unknown:
        raise TypeError(f"unknown per-row option(s) {unknown}; known: {sorted(RowOptions.__annotations__)}")
    return opts.get("generators"), opts.get("emits"), opts.get("side")


def stream_rows(model: nn.Module, prompts: Sequence[Sequence[int]], cfgs: Sequence[GenerationConfig],
                **opts: Unpack[RowOptions]) -> Iterator[tuple[int, int]]:
    """The decoding loop: yield ``(prompt_index, token_id)`` as tokens are produced, row ``i``
    decoded under ``cfgs[i]`` with the :class:`RowOptions` ``opts``. A row halted by its
    ``emits[i]`` keeps the token it was called on and gets no further forward.

    Without ``generators`` every row gets its own generator seeded from ``cfgs[i].seed``, so seeded
    rows do not depend on their batch-mates. Rows in a step come in prefill order (by prompt
    length); see the module docstring.
    """
    generators, emits, side = _row_options(dict(opts))
    _check_prompts(prompts, model.vocab_size)
    _check_per_row(len(prompts), cfgs=cfgs, generators=generators, emits=emits, side=side)
    live = [i for i, c in enumerate(cfgs) if c.max_new_tokens > 0]
    if not live:
        return
    device = next(model.parameters()).device
    if generators is None:
        generators = [None if c.seed is None else torch.Generator(device=device).manual_seed(c.seed) for c in cfgs]
    stops = [frozenset(c.stop_tokens) for c in cfgs]
    counts = [0] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        batch = _prefill(model, prompts, live, device, side)
        while True:
            with torch.inference_mode():
                tokens = _draw(batch, cfgs, generators)  # (B,)
            keep: list[int] = []  # batch rows that go on
            for j, (row, tok) in enumerate(zip(batch.rows, tokens.tolist())):
                if tok in stops[row]:
                    continue
                counts[row] += 1
                halted = emits is not None and emits[row] is not None and not emits[row](tok)  # type: ignore[misc]
                yield row, tok
                if not halted and counts[row] < cfgs[row].max_new_tokens:
                    keep.append(j)
            if not keep:
                return
            with torch.inference_mode():
                if len(keep) < len(batch.rows):
                    sel = torch.tensor(keep, dtype=torch.long, device=device)  # (B',)
                    batch.rows = [batch.rows[j] for j in keep]
                    batch.state, tokens, batch.seen = batch.state.select(sel), tokens[sel], batch.seen[sel]
                batch.seen[torch.arange(len(tokens), device=device), tokens] = True
                out = model(tokens.unsqueeze(1), batch.state, logits_to_keep=1)
                batch.state, batch.logits = out.state, out.logits[:, -1]  # (B, V)
    finally:
        model.train(was_training)


def generate_rows(model: nn.Module, prompts: Sequence[Sequence[int]], cfgs: Sequence[GenerationConfig],
                  **opts: Unpack[RowOptions]) -> list[RowOutput]:
    """Each row's tokens and finish reason under its own config; see :func:`stream_rows`."""
    _, emits, _ = _row_options(dict(opts))
    _check_per_row(len(prompts), cfgs=cfgs, emits=emits)
    halted = [False] * len(prompts)

    def watch(i: int, emit: Emit | None) -> Emit:
        def call(tok: int) -> bool:
            go = emit is None or bool(emit(tok))
            halted[i] = not go
            return go
        return call

    watched = [watch(i, None if emits is None else emits[i]) for i in range(len(prompts))]
    out: list[list[int]] = [[] for _ in prompts]
    for row, tok in stream_rows(model, prompts, cfgs, **{**opts, "emits": watched}):
        out[row].append(tok)
    # a row ends for exactly one reason: sampling stops once it holds max_new_tokens tokens
    return [RowOutput(o, "halted" if h else "length" if len(o) == c.max_new_tokens else "stop")
            for o, h, c in zip(out, halted, cfgs)]


def stream(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    side: Sequence[Any] | None = None,
) -> Iterator[tuple[int, int]]:
    """Yield ``(prompt_index, token_id)`` as tokens are produced (rows in a step: by prompt length).

    One config and one generator (passed in, or seeded from ``cfg.seed``) for the whole batch;
    ``side``: per-row side data for the model (module docstring).
    """
    cfg = cfg or GenerationConfig()
    _check_prompts(prompts, model.vocab_size)
    if not prompts or cfg.max_new_tokens == 0:
        return
    if generator is None and cfg.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    yield from stream_rows(model, prompts, [cfg] * len(prompts), generators=[generator] * len(prompts), side=side)


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    cfg: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    side: Sequence[Any] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (stop tokens excluded); see :func:`stream`."""
    out: list[list[int]] = [[] for _ in prompts]
    for row, tok in stream(model, prompts, cfg, generator, side):
        out[row].append(tok)
    return out
