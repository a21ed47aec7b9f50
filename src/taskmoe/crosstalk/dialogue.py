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
- **Randomness**: one ``torch.Generator`` drives the tokens (one draw per row per step, finished
  rows included) and then the Bernoulli draws (rows in order), so a seed reproduces a batch
  exactly. Rows of a batch share the generator: a row's transcript depends on the batch it is
  in, unless decoding is greedy and every probability is 0 or 1.

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

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from taskmoe.config import Config, check, doc
from taskmoe.crosstalk.policy import InterruptConfig, InterruptState, interrupt_probability, sample_interrupt
from taskmoe.errors import ConfigError, RequestError
from taskmoe.layers.lora import use_adapter
from taskmoe.summarizer.fuser import Draft, order_drafts

__all__ = [
    "DialogueConfig",
    "DialogueTokens",
    "Speaker",
    "Decision",
    "Turn",
    "Transcript",
    "token_logprobs",
    "choose_tokens",
    "run_dialogues",
    "run_crosstalk",
    "token_scores",
]

SENTENCE_END_CHARS = (".", "!", "?")


@dataclass
class DialogueConfig(Config):
    """How a cross-talk dialogue is generated (lengths, turns, boundaries, sampling, the policy)."""

    max_new_tokens: int = doc(48, "tokens of the whole transcript (every turn, a given opening included)")
    n_turns: int = doc(4, "[n_T] most turns (speaker stretches); no interruption once the n_T-th turn started")
    segment_tokens: int = doc(12, "a segment boundary (interrupt opportunity) after this many tokens without one")
    min_segment_tokens: int = doc(4, "a sentence end is a boundary only once this many tokens passed since the last")
    temperature: float = doc(0.8, "token policy softmax(z / T); 0 = greedy")
    interrupt: InterruptConfig = field(default_factory=InterruptConfig,
                                       metadata={"help": "constants of P_interrupt (alpha, beta, shr, squash)"})

    def validate(self) -> None:
        for f in ("max_new_tokens", "n_turns", "segment_tokens", "min_segment_tokens"):
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  f"DialogueConfig.{f} must be an integer >= 1, got {v!r}")
        check(self.min_segment_tokens <= self.segment_tokens,
              f"DialogueConfig.min_segment_tokens ({self.min_segment_tokens}) must be <= segment_tokens "
              f"({self.segment_tokens})")
        check(self.temperature >= 0, f"DialogueConfig.temperature must be >= 0, got {self.temperature}")
        if isinstance(self.interrupt, dict):
            self.interrupt = InterruptConfig.from_dict(self.interrupt, source="DialogueConfig.interrupt")


@dataclass(frozen=True)
class DialogueTokens:
    """Token ids the dialogue treats specially: stops (end a dialogue) and sentence ends (boundaries)."""

    stop_ids: frozenset[int] = frozenset()
    sentence_end_ids: frozenset[int] = frozenset()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, stop_at_eos: bool = True) -> "DialogueTokens":
        """Sentence ends: every non-special token whose text, right-stripped of spaces and tabs, ends
        in ``. ! ?``, or that holds a newline. Stops: ``<|eos|>`` (unless ``stop_at_eos=False``)."""
        special = set(getattr(tokenizer, "special_ids", {}).values())
        ends = set()
        for i in range(int(tokenizer.vocab_size)):
            if i in special:
                continue
            text = tokenizer.decode([i])
            if "\n" in text or text.rstrip(" \t").endswith(SENTENCE_END_CHARS):
                ends.add(i)
        stops = frozenset({int(tokenizer.eos_id)}) if stop_at_eos else frozenset()
        return cls(stop_ids=stops, sentence_end_ids=frozenset(ends))


@dataclass(frozen=True)
class Speaker:
    """One side of the dialogue: a name (the expert's), its LM, and its cross-talk LoRA adapter (or None)."""

    name: str
    model: nn.Module
    adapter: str | None = None


@dataclass(frozen=True)
class Decision:
    """One interrupt opportunity: at ``position`` (tokens in the transcript so far) ``listener``
    drew Bernoulli(``p``); ``t_since`` / ``i_recent`` are its state when deciding."""

    position: int
    listener: int
    p: float
    interrupted: bool
    t_since: int
    i_recent: int
    forced: bool = False


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch: ``ids`` start at ``start`` in the transcript; ``interrupted`` is True
    when the turn began by interrupting the previous speaker, with probability ``p_interrupt``
    (None for the opening turn); ``declined`` lists the probabilities of the opportunities the
    listener let pass during this turn."""

    speaker: int
    expert: str
    start: int
    ids: tuple[int, ...]
    interrupted: bool
    p_interrupt: float | None
    declined: tuple[float, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """A finished dialogue. Speaker indices refer to ``experts`` (the order the speakers were given)."""

    experts: tuple[str, str]
    confidences: tuple[float, float]
    prompt: tuple[int, ...]
    opener: int
    ids: tuple[int, ...]
    """Every transcript token in order (a given opening included; stop tokens excluded)."""
    speakers: tuple[int, ...]
    """Who wrote each token of ``ids``."""
    logprobs: tuple[float, ...]
    """log pi of each token under the token policy when it was sampled (NaN for a given opening)."""
    decisions: tuple[Decision, ...]
    crosstalk_start: int | None
    """Index in ``ids`` of the first token sampled with cross-talk engaged (None: no interruption)."""
    states: tuple[InterruptState, InterruptState]
    stop: str
    """``"length"`` (max_new_tokens reached) or ``"stop"`` (a stop token was drawn)."""

    @property
    def n_interruptions(self) -> int:
        return sum(d.interrupted for d in self.decisions)

    @property
    def turns(self) -> list[Turn]:
        """The turns, one per speaker change (an interruption is the only way the floor changes)."""
        starts = [0] + [d.position for d in self.decisions if d.interrupted]
        ends = starts[1:] + [len(self.ids)]
        hits = [None] + [d for d in self.decisions if d.interrupted]
        out, speaker = [], self.opener
        for k, (a, b) in enumerate(zip(starts, ends)):
            declined = tuple(d.p for d in self.decisions if not d.interrupted and a < d.position <= b
                             and d.listener != speaker)
            hit = hits[k]
            out.append(Turn(speaker, self.experts[speaker], a, tuple(self.ids[a:b]), hit is not None,
                            None if hit is None else hit.p, declined))
            speaker = 1 - speaker
        return out

    def tokens_of(self, speaker: int) -> list[int]:
        """Every token ``speaker`` wrote, in transcript order."""
        return [t for t, s in zip(self.ids, self.speakers) if s == speaker]

    def drafts(self, fallback: Sequence[Draft] = ()) -> list[Draft]:
        """One draft per expert (its turns joined), most confident first. An expert that never got the
        floor keeps its draft from ``fallback`` (matched by name) if there is one, else is left out."""
        out = []
        by_name = {d.expert: d for d in fallback}
        for s in (0, 1):
            ids = self.tokens_of(s)
            if ids:
                out.append(Draft(self.experts[s], float(self.confidences[s]), tuple(ids)))
            elif self.experts[s] in by_name:
                out.append(by_name[self.experts[s]])
        return order_drafts(out)

    def trace(self, decode: Callable[[list[int]], str]) -> list[dict[str, Any]]:
        """The turns as JSON-safe dicts for the pipeline trace."""
        return [{"expert": t.expert, "speaker": t.speaker, "text": decode(list(t.ids)), "tokens": len(t.ids),
                 "interrupted": t.interrupted, "p_interrupt": t.p_interrupt,
                 "declined": [round(p, 6) for p in t.declined]} for t in self.turns]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["logprobs"] = [None if math.isnan(x) else x for x in self.logprobs]
        return d


# --------------------------------------------------------------------------------- token policy
def token_logprobs(logits: Tensor, temperature: float) -> Tensor:
    """``log pi(. | context) = log_softmax(z / T)`` over the last axis, in float32.

    ``T = 0`` (greedy decoding) returns ``log_softmax(z)``, the model's own distribution, so the
    recorded log-probabilities stay meaningful.
    """
    z = logits.float()
    return torch.log_softmax(z / temperature if temperature > 0 else z, dim=-1)


def choose_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Draw one token per row from ``pi`` (argmax when ``T = 0``) -> ``(tokens (B,), log pi(token) (B,))``."""
    logp = token_logprobs(logits, temperature)  # (B, V)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


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
    generator: torch.Generator | None,
    *,
    first: Sequence[int] | None = None,
    openings: Sequence[Sequence[int]] | None = None,
    tokens: DialogueTokens = DialogueTokens(),
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
    """
    first = [0] * len(prompts) if first is None else [int(f) for f in first]
    _check(speakers, prompts, confidences, cfg, first, openings)
    if not prompts:
        return []
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
            crosstalk = torch.tensor([r.crosstalk_start is not None for r in rows], device=device)  # (B,)
            last = torch.tensor([x[-1] for x in inputs], dtype=torch.long, device=device)  # (B,)
            logits, states = [], []
            for s in speakers:
                st = _prefill(s.model, [x[:-1] for x in inputs], device)
                lg, st = _read(s.model, s.adapter, last, st, crosstalk)
                logits.append(lg)
                states.append(st)
            while True:
                spk = torch.tensor([r.speaker for r in rows], device=device)  # (B,)
                z = torch.where((spk == 0).unsqueeze(-1), logits[0], logits[1])  # (B, V)
                tok, lp = choose_tokens(z, cfg.temperature, generator)
                for r, t, p in zip(rows, tok.tolist(), lp.tolist()):
                    if not r.done:
                        _advance(r, t, p, cfg, tokens, generator)
                if all(r.done for r in rows):
                    break
                crosstalk = torch.tensor([r.crosstalk_start is not None for r in rows], device=device)
                for e, s in enumerate(speakers):
                    logits[e], states[e] = _read(s.model, s.adapter, tok, states[e], crosstalk)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    names = (speakers[0].name, speakers[1].name)
    return [Transcript(names, r.conf, tuple(map(int, p)), r.opener, tuple(r.ids), tuple(r.who), tuple(r.logp),
                       tuple(r.decisions), r.crosstalk_start, (r.states[0], r.states[1]), r.stop)
            for r, p in zip(rows, prompts)]


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
) -> Transcript:
    """One dialogue: ``first`` opens, ``second`` may interrupt (``confidences`` = (C_first, C_second))."""
    return run_dialogues([first, second], [prompt_ids], [confidences], cfg, generator, tokens=tokens)[0]


# ------------------------------------------------------------------------- teacher-forced scores
def token_scores(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    temperature: float,
    *,
    adapter: str | None = None,
    adapter_from: Sequence[int] | None = None,
) -> Tensor:
    """Teacher-forced ``log pi(x_{i+1} | x_{<=i})`` for every row -> ``(B, L - 1)`` (0 past a row's end).

    With ``adapter``, row ``b`` reads positions ``< adapter_from[b]`` with every adapter off (under
    ``no_grad``: no gradient flows into them) and the rest with ``adapter`` on, carrying the
    decode state across, which is how :func:`run_dialogues` decodes (a transcript whose cross-talk
    starts at token ``j`` after a prompt of ``P`` tokens has ``adapter_from = P + j - 1``).
    Without an adapter, one plain forward (adapters off) scores everything. Rows are grouped by
    ``adapter_from`` and right-padded (padding comes after every scored token, so it changes nothing).
    """
    B = len(rows)
    L = max(len(r) for r in rows)
    device = next(model.parameters()).device
    out = torch.zeros(B, max(L - 1, 0), device=device)
    splits = [0] * B if adapter is None else [int(s) for s in (adapter_from or [])]
    if len(splits) != B:
        raise ConfigError(f"token_scores: {B} rows but {len(splits)} adapter_from positions")
    groups: dict[int, list[int]] = defaultdict(list)
    for b, s in enumerate(splits):
        if adapter is not None and not 0 <= s < len(rows[b]):
            raise ConfigError(f"token_scores: row {b} switches the adapter on at {s}, outside its {len(rows[b])} tokens")
        groups[s].append(b)
    for s, idx in sorted(groups.items()):
        n = max(len(rows[b]) for b in idx)
        ids = torch.zeros(len(idx), n, dtype=torch.long, device=device)  # (b, n), right-padded
        for k, b in enumerate(idx):
            ids[k, : len(rows[b])] = torch.tensor(list(rows[b]), dtype=torch.long)
        if adapter is None:
            with use_adapter(model, None):
                logits = model(ids).logits  # (b, n, V)
        else:
            parts = []
            state = model.init_state(len(idx))
            if s > 0:
                with torch.no_grad(), use_adapter(model, None):
                    pre = model(ids[:, :s], state)
                parts.append(pre.logits.detach())
                state = pre.state
            with use_adapter(model, adapter):
                parts.append(model(ids[:, s:], state).logits)
            logits = torch.cat(parts, dim=1)  # (b, n, V)
        logp = token_logprobs(logits[:, :-1], temperature)  # (b, n - 1, V)
        picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, n - 1)
        for k, b in enumerate(idx):
            m = len(rows[b]) - 1
            out[b, :m] = picked[k, :m]
    return out
