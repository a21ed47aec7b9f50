"""The summarizer's fusion prompt: the question plus every selected expert's draft, as token ids.

Format (special tokens from the shared tokenizer; ``P`` prompt, ``D_i`` drafts, ``A`` answer)::

    <|bos|> <|user|> P
    <|expert|> " legal conf=0.87 " <|draft|> D_1 <|end_draft|>
    <|expert|> " code conf=0.13 " <|draft|> D_2 <|end_draft|>
    <|answer|> A <|eos|>

Design choices:

- **Most confident first.** Sections are sorted by router confidence (descending, ties by
  name), so the position of a draft already tells the model how much to trust it.
- **Confidence as text digits** (``conf=0.87``, two decimals) in the section header, not a
  learned confidence embedding: the summarizer is an ordinary ``CausalLM`` whose forward takes
  token ids only, and a side-channel embedding would need a second input path through every
  block and into decode state. Digits are ordinary tokens the model reads like any other, and
  with the ordering they carry the same information.
- **Ids, not text.** Each piece is tokenized on its own and the ids are concatenated with the
  special-token ids in between: no special token can be forged by a draft's text and no BPE
  merge crosses a section boundary. Experts hand over their drafts as ids anyway (the engine
  speaks ids); :func:`fusion_text` renders the same layout as text for traces.
- **One place truncates.** :func:`fit_budget` decides every length. The question and the
  answer are never cut (if they alone do not fit, :class:`~taskmoe.errors.RequestError` says
  by how much). Drafts share what is left by *max-min fairness* (water-filling: short drafts
  keep all their tokens, the rest is split evenly among the longer ones, confident drafts get
  the rounding remainder), each keeps its *first* tokens (a draft continues the prompt, so its
  beginning is the most relevant part). If even the section headers do not fit, the least
  confident drafts are dropped whole, and the result says which.
- **Loss only on the answer.** :meth:`FusedSequence.targets` follows the shared convention of
  :mod:`taskmoe.training.losses` (targets aligned with logits, ``targets[t] = ids[t + 1]``):
  every position whose next token is not part of the answer (or its final ``<|eos|>``) carries
  ``-100``.

Glossary: ``L_max`` total length budget, ``n`` number of drafts, ``h_i`` header length of draft
``i`` (``<|expert|>`` + name/confidence text + ``<|draft|>`` + ``<|end_draft|>``), ``d_i`` draft
length before truncation, ``k_i`` tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from taskmoe.errors import ConfigError, RequestError

if TYPE_CHECKING:  # pragma: no cover
    from taskmoe.data.tokenizer import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "Draft",
    "FusedSequence",
    "FusionFormat",
    "header_text",
    "order_drafts",
    "water_fill",
    "fit_budget",
    "place_drafts",
    "fusion_text",
    "collate",
]

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|expert|>", "<|draft|>", "<|end_draft|>", "<|answer|>")


@dataclass(frozen=True)
class Draft:
    """One expert's draft: its name, router confidence in [0, 1], and its token ids."""

    expert: str
    confidence: float
    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.confidence) <= 1.0:
            raise ConfigError(f"draft of '{self.expert}': confidence {self.confidence} is not in [0, 1]")
        object.__setattr__(self, "ids", tuple(int(t) for t in self.ids))


def header_text(expert: str, confidence: float) -> str:
    """The text between ``<|expert|>`` and ``<|draft|>``: ``" legal conf=0.87 "``."""
    return f" {expert} conf={confidence:.2f} "


def order_drafts(drafts: Sequence[Draft]) -> list[Draft]:
    """Most confident first; ties broken by expert name so the order is deterministic."""
    return sorted(drafts, key=lambda d: (-float(d.confidence), d.expert))


def water_fill(lengths: Sequence[int], budget: int) -> list[int]:
    """Max-min fair split of ``budget`` tokens among drafts of ``lengths``.

    Returns ``k`` with ``k_i <= lengths_i`` and ``sum k = min(budget, sum lengths)``; a draft
    shorter than its fair share keeps everything and the surplus goes to the others. Visiting
    drafts by increasing length (ties: later = less confident first),
    ``k_i = min(d_i, floor(remaining / drafts_left))``, so the earlier (more confident) of equal
    drafts receive the rounding remainder. Example: lengths (10, 2, 10), budget 15 ->
    (7, 2, 6).
    """
    if budget < 0:
        raise ConfigError(f"water_fill: negative budget {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], -i))
    out = [0] * len(lengths)
    remaining = budget
    for pos, i in enumerate(order):
        share = remaining // (len(order) - pos)
        out[i] = min(int(lengths[i]), share)
        remaining -= out[i]
    return out


def fit_budget(fixed: int, header_lens: Sequence[int], draft_lens: Sequence[int], max_len: int) -> list[int | None]:
    """THE truncation rule: tokens kept per draft (``None`` = dropped), drafts most confident first.

    ``fixed`` counts every token that is never cut (bos, prompt, answer marker, answer, eos).
    Drafts are dropped from the least confident end until the remaining headers leave at least
    one token per kept draft; the rest is split by :func:`water_fill`.
    """
    if fixed > max_len:
        raise RequestError(
            f"the question (and answer) alone take {fixed} tokens, over the summarizer's budget of {max_len} "
            f"by {fixed - max_len}; shorten the prompt or raise max_len"
        )
    keep = len(draft_lens)
    while keep > 0 and max_len - fixed - sum(header_lens[:keep]) < keep:
        keep -= 1
    room = max_len - fixed - sum(header_lens[:keep])
    kept: list[int | None] = list(water_fill(draft_lens[:keep], room))
    return kept + [None] * (len(draft_lens) - keep)


@dataclass
class FusedSequence:
    """One fusion prompt as ids, with where the answer starts and what the budget did."""

    ids: list[int]
    answer_start: int
    """Index in ``ids`` of the first answer token (one past ``<|answer|>``); == len(ids) at inference."""
    experts: list[str]
    """Experts whose drafts are in the prompt, in prompt order (most confident first)."""
    truncated: dict[str, tuple[int, int]] = field(default_factory=dict)
    """expert -> (draft length, tokens kept) for every cut draft."""
    dropped: list[str] = field(default_factory=list)
    """Experts whose whole section did not fit."""

    def targets(self) -> list[int]:
        """Next-token targets aligned with ``ids``; -100 except where the next token is answer/eos."""
        t = [IGNORE_INDEX] * len(self.ids)
        for i in range(max(self.answer_start - 1, 0), len(self.ids) - 1):
            t[i] = self.ids[i + 1]
        return t


class FusionFormat:
    """Builds fusion prompts from a tokenizer with the taskmoe special tokens."""

    def __init__(self, tokenizer: "Tokenizer", max_len: int = 1024) -> None:
        specials = getattr(tokenizer, "special_ids", {})
        missing = [s for s in SPECIAL_TOKENS if s not in specials]
        if missing:
            raise ConfigError(f"the tokenizer lacks the fusion special tokens {missing}; retrain it with taskmoe.data.tokenizer")
        if max_len < 8:
            raise ConfigError(f"fusion max_len must be >= 8, got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.sp = {s: int(specials[s]) for s in SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        """Plain-text ids (a special-token string in ``text`` is encoded as bytes, never as the token)."""
        return list(self.tokenizer.encode(text, allow_special=False))

    @property
    def eos_id(self) -> int:
        return self.sp["<|eos|>"]

    def head(self, prompt_ids: Sequence[int]) -> list[int]:
        """``<|bos|><|user|> prompt``: the part of every fusion sequence the intent head reads."""
        return [self.sp["<|bos|>"], self.sp["<|user|>"], *map(int, prompt_ids)]

    def build(
        self,
        prompt_ids: Sequence[int],
        drafts: Sequence[Draft],
        answer_ids: Sequence[int] | None = None,
        *,
        max_len: int | None = None,
    ) -> FusedSequence:
        """The fusion sequence. With ``answer_ids`` (training) it ends ``<|answer|> A <|eos|>``;
        without (inference) it ends with ``<|answer|>`` and the summarizer continues from there."""
        max_len = self.max_len if max_len is None else max_len
        sp = self.sp
        ordered = order_drafts(drafts)
        headers = [[sp["<|expert|>"], *self.encode(header_text(d.expert, d.confidence)), sp["<|draft|>"]] for d in ordered]
        answer = [] if answer_ids is None else [*map(int, answer_ids), sp["<|eos|>"]]
        head = [sp["<|bos|>"], sp["<|user|>"], *map(int, prompt_ids)]
        fixed = len(head) + 1 + len(answer)  # + <|answer|>
        kept = fit_budget(fixed, [len(h) + 1 for h in headers], [len(d.ids) for d in ordered], max_len)
        seq = place_drafts(head, ordered, headers, kept, [sp["<|end_draft|>"]])
        seq.ids.append(sp["<|answer|>"])
        seq.answer_start = len(seq.ids)
        seq.ids += answer
        return seq


def place_drafts(head: Sequence[int], ordered: Sequence[Draft], headers: Sequence[Sequence[int]],
                 kept: Sequence[int | None], closer: Sequence[int] = ()) -> FusedSequence:
    """``head`` then, per kept draft, ``header + first k_i draft tokens + closer`` (the budget's verdict
    ``kept`` from :func:`fit_budget`); the result records kept, cut and dropped drafts, ``answer_start``
    at the end (the caller appends its answer marker and answer)."""
    ids = [int(t) for t in head]
    experts: list[str] = []
    truncated: dict[str, tuple[int, int]] = {}
    dropped: list[str] = []
    for d, h, k in zip(ordered, headers, kept):
        if k is None:
            dropped.append(d.expert)
            continue
        ids += [*h, *d.ids[:k], *closer]
        experts.append(d.expert)
        if k < len(d.ids):
            truncated[d.expert] = (len(d.ids), k)
    return FusedSequence(ids=ids, answer_start=len(ids), experts=experts, truncated=truncated, dropped=dropped)


def fusion_text(prompt: str, drafts: Sequence[tuple[str, float, str]], answer: str | None = None) -> str:
    """The same layout as :meth:`FusionFormat.build`, as text (for traces and docs; untruncated)."""
    parts = ["<|bos|><|user|>", prompt]
    for name, conf, text in sorted(drafts, key=lambda d: (-float(d[1]), d[0])):
        parts += ["<|expert|>", header_text(name, conf), "<|draft|>", text, "<|end_draft|>"]
    parts.append("<|answer|>")
    if answer is not None:
        parts += [answer, "<|eos|>"]
    return "".join(parts)


def collate(seqs: Sequence[FusedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` (B, T) with ``pad_id``, ``targets`` (B, T) with -100."""
    if not seqs:
        raise ConfigError("collate: empty batch")
    T = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    tgt = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        tgt[b, : len(s.ids)] = torch.tensor(s.targets(), dtype=torch.long)
    return {"input_ids": ids, "targets": tgt}
