"""The data of a cross-talk dialogue and its token policy (used by :mod:`taskmoe.crosstalk.dialogue`).

- :class:`DialogueConfig` (lengths, turns, boundaries, sampling, the interrupt constants),
  :class:`DialogueTokens` (stop ids, sentence-end ids), :class:`Speaker` (an expert, its LM and its
  cross-talk adapter);
- :class:`Decision`, :class:`Turn`, :class:`Transcript`: a finished dialogue, its interrupt
  decisions and turns, one draft per speaker for the summarizer (:meth:`Transcript.drafts`) and the
  JSON-safe turns for the pipeline trace (:meth:`Transcript.trace`);
- the token policy ``pi(. | context) = softmax(z / T)`` (:func:`token_logprobs`, :func:`choose_tokens`;
  ``T = 0`` is greedy) and its teacher-forced twin :func:`token_scores` (what the GAN differentiates).

Glossary as in :mod:`taskmoe.crosstalk.dialogue` (n_T turns, C confidence, ``B`` rows, ``V`` vocabulary).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from taskmoe.config import Config, check, check_ints, check_min, doc
from taskmoe.crosstalk.policy import InterruptConfig, InterruptState
from taskmoe.errors import ConfigError
from taskmoe.layers.lora import use_adapter
from taskmoe.summarizer.fuser import Draft, order_drafts

__all__ = ["DialogueConfig", "DialogueTokens", "Speaker", "Decision", "Turn", "Transcript", "token_logprobs",
           "choose_tokens", "token_scores", "SENTENCE_END_CHARS"]

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
        check_ints(self, ("max_new_tokens", "n_turns", "segment_tokens", "min_segment_tokens"))
        check(self.min_segment_tokens <= self.segment_tokens,
              f"DialogueConfig.min_segment_tokens ({self.min_segment_tokens}) must be <= segment_tokens "
              f"({self.segment_tokens})")
        check_min(self, ("temperature",))
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
    """``"length"`` (max_new_tokens reached), ``"stop"`` (a stop token was drawn) or ``"halted"`` (``emit`` said stop)."""

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
