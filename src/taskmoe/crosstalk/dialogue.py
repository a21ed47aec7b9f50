"""Interleaved generation between two experts: the IMoE seed's cross-talk dialogue.

When the router flags two categories as too close to call (top two confidences within t_CT), the
two experts talk it out: the *opener* (normally the more confident one) drafts; at every segment
boundary the *listener* may interrupt, with the probability of :mod:`taskmoe.crosstalk.policy`
drawn as a Bernoulli from a seeded generator, and then continues from the shared transcript;
up to n_T turns. :func:`run_dialogues` runs a batch of dialogues, :func:`run_crosstalk` one.

Design choices:

- **Both experts read every token (lockstep).** Each expert keeps its own explicit decode state
  and consumes every transcript token, whoever wrote it; at each step the next token is sampled
  from the current speaker's logits (rows of a batch may have different speakers). An
  interruption is then free (no re-reading of the transcript), a batch of dialogues with
  different interruption points decodes in one forward per expert per token, and the listener is
  always ready to speak. Ragged prompts are prefilled in groups of equal length (no padding
  enters a recurrent state), as in :mod:`taskmoe.inference.generate`.
- **Adapters only during cross-talk.** Cross-talk *engages* at the first interruption. Before it,
  both experts run with every LoRA adapter off (the opener's first turn is exactly its ordinary
  draft); from the forward pass that reads the last token before the interruption onwards, each
  expert runs with its cross-talk adapter (:attr:`Speaker.adapter`) on, per row
  (:func:`taskmoe.layers.lora.use_adapter` with a row mask). Every forward pass sets the switch
  explicitly, so whatever state the model was left in does not leak in; the previous switch
  state is restored afterwards. The GAN trainer recomputes the same split in one teacher-forced
  pass (:func:`token_scores`), so its policy gradient differentiates exactly the distribution the
  tokens were drawn from.
- **Segment boundaries** are the interrupt opportunities: after ``segment_tokens`` tokens since
  the last boundary, or at a sentence end (a token whose text ends in ``. ! ?`` or holds a
  newline, see :meth:`DialogueTokens.from_tokenizer`) once ``min_segment_tokens`` tokens passed.
  No decision is taken once n_T turns have started, nor after the last token.
- **The interrupt clock.** ``T_since`` counts boundaries. At each boundary the listener decides
  and its state becomes ``state.after(interrupted)`` (an interruption resets T_since to 1 and
  extends its run I_recent; declining ages T_since and ends the run); the speaker's state
  becomes ``state.aged()`` (T_since ages, the run is kept: speaking is not declining). Both
  start at ``InterruptState(1, 0)``. So I_recent > 0 together with T_since > 1 means "it
  interrupted, got interrupted back, and wants the floor again": the seed's penalty for
  consecutive interruptions applies exactly there.
- **Token policy** ``pi(. | context) = softmax(z / T)`` (:func:`token_logprobs`); ``T = 0`` is
  greedy. The log-probability of every sampled token is recorded in the transcript.
- **A given opening** (``openings``): the opener's first turn may be supplied instead of sampled
  and the listener then interrupts right after it (probability 1, ``forced``). The GAN uses this
  so the interrupted and the uninterrupted texts share their opening.
- **Randomness**: either one shared ``torch.Generator`` drives the tokens (one draw per row per
  step, finished rows included) and then the Bernoulli draws (rows in order), so a seed
  reproduces a batch exactly but a row's transcript depends on its batch (unless decoding is
  greedy and every probability is 0 or 1); or a **generator per row** (a sequence): each row
  draws its tokens and its Bernoullis from its own generator, so a row equals that row run alone
  with the same seed whatever its batch-mates (tested), and finished rows leave the batch.
- **Stopping** (``emit``): after each token a row appends, ``emit(row, token, speaker)`` is
  called (streaming); returning False ends that row at once (``stop = "halted"``) and the row
  leaves the batch before the next forward, so a cancelled row costs no further decode step.
  (With a shared generator, rows that ended by length or a stop token stay in the batch, as
  above; halted rows always leave.)

To the summarizer the transcript becomes **one draft per speaker** (:meth:`Transcript.drafts`):
each expert's turns, joined in order, under its own name and router confidence. That keeps the
fusion format the summarizer was trained on (one ``<|expert|> name conf=..`` section per
expert, most confident first) and keeps attribution exact; the interleaving itself is kept in
the transcript and the trace (:meth:`Transcript.trace`).

Glossary: n_T (``n_turns``) most turns; C the listener's router confidence; T_since, I_recent,
alpha, beta, shr as in :mod:`taskmoe.crosstalk.policy`; ``B`` batch rows, ``V`` vocabulary,
``P`` prompt length; "turn" = one speaker's uninterrupted stretch of the transcript.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from taskmoe.crosstalk.policy import InterruptState, interrupt_probability, sample_interrupt
from taskmoe.crosstalk.transcript import (
    DialogueConfig,
    DialogueTokens,
    Decision,
    Speaker,
    Transcript,
    Turn,
    choose_tokens,
    token_logprobs,
    token_scores,
)
from taskmoe.errors import ConfigError, RequestError
from taskmoe.layers.lora import use_adapter

__all__ = [
    "DialogueConfig",
    "DialogueTokens",
    "Speaker",
    "Decision",
    "Turn",
    "Transcript",
    "DialogueEmit",
    "token_logprobs",
    "choose_tokens",
    "run_dialogues",
    "run_crosstalk",
    "token_scores",
]

DialogueEmit = Callable[[int, int, int], bool]
"""``emit(row, token, speaker) -> keep going``: called after each token a row appends."""

# ------------------------------------------------------------------------------------- engine
def _adapter_switch(adapter: str | None, rows: Tensor) -> tuple[str | None, Tensor | None]:
    """(adapter name, row mask) for :func:`use_adapter`: off unless some row is in cross-talk."""
    if adapter is None or not bool(rows.any()):
        return None, None
    return adapter, None if bool(rows.all()) else rows


def _prefill(model: nn.Module, contexts: Sequence[Sequence[int]], device: torch.device) -> Any:
    """The decode state after reading each row's context (adapters off), rows in input order.

    Rows are grouped by context length (one forward per length, no padding); an empty context
    gives the model's initial state.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(contexts):
        groups[len(c)].append(i)
    order, states = [], []
    with use_adapter(model, None):
        for length in sorted(groups):
            idx = groups[length]
            st = model.init_state(len(idx))
            if length:
                ids = torch.tensor([list(contexts[i]) for i in idx], dtype=torch.long, device=device)  # (b, length)
                st = model(ids, st, logits_to_keep=1).state
            order += idx
            states.append(st)
    state = states[0] if len(states) == 1 else type(states[0]).cat(states)
    if order != sorted(order):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        state = state.select(inverse.to(device))
    return state


def _read(model: nn.Module, adapter: str | None, tokens: Tensor, state: Any, crosstalk: Tensor) -> tuple[Tensor, Any]:
    """Feed one token per row (B,) -> next-token logits (B, V) and the new state; the adapter is on
    exactly for the rows in cross-talk."""
    name, rows = _adapter_switch(adapter, crosstalk)
    with use_adapter(model, name, rows):
        out = model(tokens.unsqueeze(1), state, logits_to_keep=1)  # (B, 1) -> logits (B, 1, V)
    return out.logits[:, -1], out.state


@dataclass
class _Row:
    """Per-row bookkeeping of :func:`run_dialogues` (plain Python: decisions are per row)."""

    opener: int
    speaker: int
    conf: tuple[float, float]
    ids: list[int] = field(default_factory=list)
    who: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    states: list[InterruptState] = field(default_factory=lambda: [InterruptState(), InterruptState()])
    turns: int = 1
    since: int = 0
    crosstalk_start: int | None = None
    done: bool = False
    stop: str = "length"

    def decide(self, listener: int, p: float, hit: bool, forced: bool = False) -> None:
        st = self.states[listener]
        self.decisions.append(Decision(len(self.ids), listener, p, hit, st.t_since, st.i_recent, forced))
        self.states[listener] = st.after(hit)
        self.states[1 - listener] = self.states[1 - listener].aged()
        if hit:
            self.speaker = listener
            self.turns += 1
            self.since = 0
            if self.crosstalk_start is None:
                self.crosstalk_start = len(self.ids)


def _check(speakers: Sequence[Speaker], prompts: Sequence[Sequence[int]], confidences: Sequence[Sequence[float]],
           cfg: DialogueConfig, first: Sequence[int], openings: Sequence[Sequence[int]] | None) -> int:
    if len(speakers) != 2:
        raise ConfigError(f"a cross-talk dialogue has exactly two speakers, got {len(speakers)}")
    if speakers[0].model is speakers[1].model:
        raise ConfigError(f"the two speakers '{speakers[0].name}' and '{speakers[1].name}' share one model; "
                          "cross-talk needs two experts")
    vocab = {int(s.model.vocab_size) for s in speakers}
    if len(vocab) != 1:
        raise ConfigError(f"speakers have different vocabularies {sorted(vocab)}; experts must share one")
    V = vocab.pop()
    if len(confidences) != len(prompts) or len(first) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(confidences)} confidence pairs and {len(first)} openers")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise RequestError(f"dialogue prompt {i} is empty (it needs at least one token, e.g. BOS)")
        bad = [t for t in p if not 0 <= int(t) < V]
        if bad:
            raise RequestError(f"dialogue prompt {i} has token ids outside [0, {V}): {bad[:5]}")
        c = confidences[i]
        if len(c) != 2 or not all(0.0 <= float(x) <= 1.0 for x in c):
            raise ConfigError(f"row {i}: confidences must be two numbers in [0, 1], got {list(c)}")
        if first[i] not in (0, 1):
            raise ConfigError(f"row {i}: opener must be 0 or 1, got {first[i]}")
    if openings is not None:
        if len(openings) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(openings)} openings")
        if cfg.n_turns < 2:
            raise ConfigError("a given opening is followed by an interruption, which needs n_turns >= 2")
        for i, o in enumerate(openings):
            if not 1 <= len(o) < cfg.max_new_tokens:
                raise ConfigError(f"opening {i} has {len(o)} tokens; it needs 1 .. max_new_tokens - 1 = "
                                  f"{cfg.max_new_tokens - 1} so the interrupting expert has room to speak")
            if any(not 0 <= int(t) < V for t in o):
                raise RequestError(f"opening {i} has token ids outside [0, {V})")
    return V


def run_dialogues(
    speakers: Sequence[Speaker],
    prompts: Sequence[Sequence[int]],
    confidences: Sequence[Sequence[float]],
    cfg: DialogueConfig,
    generator: torch.Generator | Sequence[torch.Generator | None] | None,
    *,
    first: Sequence[int] | None = None,
    openings: Sequence[Sequence[int]] | None = None,
    tokens: DialogueTokens = DialogueTokens(),
    emit: DialogueEmit | None = None,
) -> list[Transcript]:
    """Run one cross-talk dialogue per prompt, all rows decoded together (see the module docstring).

    Args:
        speakers: the two experts (index 0 and 1 in every transcript).
        prompts: token ids per row (what both experts read first; include BOS if the experts expect it).
        confidences: per row, the router confidence C of speaker 0 and speaker 1.
        first: per row, which speaker opens (default 0).
        openings: per row, the opener's first turn, given instead of sampled; the other speaker then
            interrupts right after it (a forced decision with p = 1).
        tokens: stop ids and sentence-end ids (:meth:`DialogueTokens.from_tokenizer`).
        generator: one shared generator, or one per row (see "Randomness" in the module docstring).
        emit: ``emit(row, token, speaker) -> bool`` after each appended token; False halts the row.
    """
    first = [0] * len(prompts) if first is None else [int(f) for f in first]
    _check(speakers, prompts, confidences, cfg, first, openings)
    if not prompts:
        return []
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != len(prompts):  # type: ignore[arg-type]
        raise ConfigError(f"{len(prompts)} prompts but {len(generator)} generators")  # type: ignore[arg-type]
    gens: list[Any] = list(generator) if per_row else [generator] * len(prompts)  # type: ignore[arg-type]
    models = [s.model for s in speakers]
    device = next(models[0].parameters()).device
    was_training = [m.training for m in models]
    rows = [_Row(opener=f, speaker=f, conf=(float(c[0]), float(c[1]))) for f, c in zip(first, confidences)]
    inputs = [list(map(int, p)) for p in prompts]
    if openings is not None:
        for r, o, x in zip(rows, openings, inputs):
            r.ids, r.who, r.logp = list(map(int, o)), [r.opener] * len(o), [math.nan] * len(o)
            x.extend(r.ids)
            r.decide(1 - r.opener, 1.0, True, forced=True)
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            live = list(range(len(rows)))  # batch position -> row index
            crosstalk = torch.tensor([r.crosstalk_start is not None for r in rows], device=device)  # (B,)
            last = torch.tensor([x[-1] for x in inputs], dtype=torch.long, device=device)  # (B,)
            logits, states = [], []
            for s in speakers:
                st = _prefill(s.model, [x[:-1] for x in inputs], device)
                lg, st = _read(s.model, s.adapter, last, st, crosstalk)
                logits.append(lg)
                states.append(st)
            while True:
                spk = torch.tensor([rows[i].speaker for i in live], device=device)  # (B,)
                z = torch.where((spk == 0).unsqueeze(-1), logits[0], logits[1])  # (B, V)
                tok, lp = _draw(z, cfg.temperature, generator, [gens[i] for i in live], per_row)
                for i, t, p in zip(live, tok.tolist(), lp.tolist()):
                    r = rows[i]
                    if r.done:
                        continue
                    n = len(r.ids)
                    _advance(r, t, p, cfg, tokens, gens[i])
                    if emit is not None and len(r.ids) > n and not emit(i, t, r.who[-1]) and not r.done:
                        r.done, r.stop = True, "halted"
                keep = [j for j, i in enumerate(live) if not (rows[i].done and (per_row or rows[i].stop == "halted"))]
                if all(r.done for r in rows) or not keep:
                    break
                if len(keep) < len(live):  # finished (per-row) or halted rows leave the batch
                    sel = torch.tensor(keep, dtype=torch.long, device=device)  # (B',)
                    live, tok = [live[j] for j in keep], tok[sel]
                    states = [st.select(sel) for st in states]
                crosstalk = torch.tensor([rows[i].crosstalk_start is not None for i in live], device=device)
                for e, s in enumerate(speakers):
                    logits[e], states[e] = _read(s.model, s.adapter, tok, states[e], crosstalk)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    names = (speakers[0].name, speakers[1].name)
    return [Transcript(names, r.conf, tuple(map(int, p)), r.opener, tuple(r.ids), tuple(r.who), tuple(r.logp),
                       tuple(r.decisions), r.crosstalk_start, (r.states[0], r.states[1]), r.stop)
            for r, p in zip(rows, prompts)]


def _draw(z: Tensor, temperature: float, shared: Any, gens: Sequence[Any], per_row: bool) -> tuple[Tensor, Tensor]:
    """One token per live row: one draw from the shared generator, or one per row from its own."""
    if not per_row or temperature == 0:
        return choose_tokens(z, temperature, shared if not per_row else None)
    picks = [choose_tokens(z[j : j + 1], temperature, g) for j, g in enumerate(gens)]  # (1,) each
    return torch.cat([t for t, _ in picks]), torch.cat([p for _, p in picks])


def _advance(r: _Row, tok: int, logp: float, cfg: DialogueConfig, marks: DialogueTokens,
             generator: torch.Generator | None) -> None:
    """Append one sampled token to a row, then take the interrupt decision if it ends a segment."""
    if tok in marks.stop_ids:
        r.done, r.stop = True, "stop"
        return
    r.ids.append(tok)
    r.who.append(r.speaker)
    r.logp.append(logp)
    if len(r.ids) >= cfg.max_new_tokens:
        r.done, r.stop = True, "length"
        return
    r.since += 1
    boundary = r.since >= cfg.segment_tokens or (tok in marks.sentence_end_ids and r.since >= cfg.min_segment_tokens)
    if not boundary:
        return
    r.since = 0
    if r.turns >= cfg.n_turns:
        return
    listener = 1 - r.speaker
    st = r.states[listener]
    p = interrupt_probability(r.conf[listener], st.t_since, st.i_recent, cfg.interrupt)
    r.decide(listener, p, sample_interrupt(p, generator))


def run_crosstalk(
    first: Speaker,
    second: Speaker,
    prompt_ids: Sequence[int],
    confidences: tuple[float, float],
    cfg: DialogueConfig,
    generator: torch.Generator | None,
    *,
    tokens: DialogueTokens = DialogueTokens(),
    emit: DialogueEmit | None = None,
) -> Transcript:
    """One dialogue: ``first`` opens, ``second`` may interrupt (``confidences`` = (C_first, C_second))."""
    return run_dialogues([first, second], [prompt_ids], [confidences], cfg, generator, tokens=tokens, emit=emit)[0]
