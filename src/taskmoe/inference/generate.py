"""Batched autoregressive generation over token ids, with streaming.

``generate(model, prompts, cfg)`` returns one list of new token ids per prompt;
``stream(...)`` yields ``(row, token)`` pairs as they are produced (``generate`` is built on it).
The model is anything with ``init_state(batch_size)`` and ``forward(ids, state, logits_to_keep=1)
-> LMOutput`` whose state supports ``cat``/``select`` (every :class:`taskmoe.nn.CausalLM`).

Ragged prompts, exactly: left-padding would feed pad tokens into convolution buffers and recurrent
states (and shift positions), so it is not exact. Instead prompts are **prefilled in groups of
equal length** (one batched forward per distinct length, no padding at all), then the groups'
states are concatenated (fixed-size recurrent states stack directly; KV caches keep per-row
lengths and mask the unused slots) and **decoded together**, one token per row per step. A row
that emits a stop token is dropped from the batch (``state.select``), so finished rows cost
nothing. The result for each row equals running that row alone (tested).

Determinism: all randomness comes from one ``torch.Generator`` (passed in, or seeded from
``cfg.seed``); rows are prefilled in ascending length order and sampled in that order.
Stop tokens end a row and are not included in its output.
Model calls run under ``torch.inference_mode``, entered per call and never across a ``yield``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from taskmoe.config import Config, check, doc
from taskmoe.errors import RequestError
from taskmoe.inference.sampling import repetition_penalty, sample, seen_mask


@dataclass
class GenerationConfig(Config):
    max_new_tokens: int = doc(64, "maximum tokens generated per prompt (a stop token ends a row earlier)")
    temperature: float = doc(1.0, "softmax temperature; 0 = greedy decoding")
    top_k: int = doc(0, "sample among the k most likely tokens; 0 = no limit")
    top_p: float = doc(1.0, "nucleus sampling mass in (0, 1]; 1 = no limit")
    repetition_penalty: float = doc(1.0, "CTRL repetition penalty (> 1 discourages tokens already seen); 1 = off")
    stop_tokens: list[int] = doc([], "token ids that end a row (not included in the output)")
    seed: int | None = doc(None, "seed of the sampling generator when none is passed; None = nondeterministic")

    def validate(self) -> None:
        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
              f"GenerationConfig.max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        check(self.temperature >= 0, f"GenerationConfig.temperature must be >= 0, got {self.temperature}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"GenerationConfig.top_k must be an integer >= 0, got {self.top_k!r}")
        check(0 < self.top_p <= 1, f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        check(self.repetition_penalty > 0, f"GenerationConfig.repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_tokens),
              f"GenerationConfig.stop_tokens must be non-negative integers, got {self.stop_tokens!r}")


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not isinstance(prompts, (list, tuple)):
        raise RequestError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise RequestError(f"prompt {i} is empty (generation needs at least one token, e.g. BOS)")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


@dataclass
class _Batch:
    rows: list[int]  # original prompt index of each batch row
    state: object
    logits: torch.Tensor  # (B, V): next-token logits of each row
    seen: torch.Tensor  # (B, V) bool, for the repetition penalty


def _prefill(model: nn.Module, prompts: Sequence[Sequence[int]], device: torch.device) -> _Batch:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    rows, states, logits = [], [], []
    with torch.inference_mode():
        for length in sorted(groups):
            idx = groups[length]
            ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long, device=device)  # (b, length)
            out = model(ids, model.init_state(len(idx)), logits_to_keep=1)
            rows += idx
            states.append(out.state)
            logits.append(out.logits[:, -1])
        state = states[0] if len(states) == 1 else type(states[0]).cat(states)
        vocab = logits[0].shape[-1]
        return _Batch(rows, state, torch.cat(logits), seen_mask([prompts[i] for i in rows], vocab, device))


def stream(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[int, int]]:
    """Yield ``(prompt_index, token_id)`` as tokens are produced (rows in a step: by prompt length)."""
    cfg = cfg or GenerationConfig()
    _check_prompts(prompts, model.vocab_size)
    if not prompts or cfg.max_new_tokens == 0:
        return
    device = next(model.parameters()).device
    if generator is None and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    try:
        batch = _prefill(model, prompts, device)
        stops = torch.tensor(sorted(set(cfg.stop_tokens)), dtype=torch.long, device=device)
        for step in range(cfg.max_new_tokens):
            with torch.inference_mode():
                logits = repetition_penalty(batch.logits, batch.seen, cfg.repetition_penalty)
                tokens = sample(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                generator=generator)  # (B,)
                done = torch.isin(tokens, stops)
            for row, tok, fin in zip(batch.rows, tokens.tolist(), done.tolist()):
                if not fin:
                    yield row, tok
            if step == cfg.max_new_tokens - 1 or bool(done.all()):
                return
            with torch.inference_mode():
                if bool(done.any()):
                    keep = (~done).nonzero().squeeze(-1)
                    batch.rows = [batch.rows[i] for i in keep.tolist()]
                    batch.state, tokens, batch.seen = batch.state.select(keep), tokens[keep], batch.seen[keep]
                batch.seen[torch.arange(len(tokens), device=device), tokens] = True
                out = model(tokens.unsqueeze(1), batch.state, logits_to_keep=1)
                batch.state, batch.logits = out.state, out.logits[:, -1]
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    cfg: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (stop tokens excluded); see :func:`stream`."""
    out: list[list[int]] = [[] for _ in prompts]
    for row, tok in stream(model, prompts, cfg, generator):
        out[row].append(tok)
    return out
