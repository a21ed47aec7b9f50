"""Fusion training pairs (prompt -> target, as token ids) cut from corpus documents.

Two kinds, both deterministic functions of the document id (no global RNG):

- **continuation** (any document): a cut point inside the document splits it into a prefix,
  the *prompt* (the last ``prompt_tokens`` tokens before the cut), and the true continuation,
  the *target* (the next ``target_tokens`` tokens). The cut is drawn uniformly from the
  positions that leave room for at least ``min_prompt`` prompt and ``min_target`` target tokens.
- **reply** (dialogues rendered as ``A: ...`` / ``B: ...`` lines, the default corpus's
  conversation format): the prompt is one speaker's line followed by the other speaker's tag
  (``"A: how are you?\\nB:"``), the target is the reply's text. Keeping the corpus's own
  format means the experts, which were trained on that format, continue it naturally.

Lengths are in tokens so the fusion budget (:mod:`taskmoe.summarizer.fuser`) is predictable;
prompts are cut from the left (keep the tokens nearest the cut) and targets from the right.
This is data preparation and would sit in ``taskmoe.data`` if it did not depend on the fusion
format's needs; it imports nothing above ``data``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from taskmoe.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from taskmoe.data import Document
    from taskmoe.data.tokenizer import Tokenizer

__all__ = ["FusionPair", "continuation_pair", "dialogue_turns", "reply_pairs", "fusion_pairs"]

_TURN = re.compile(r"^([A-Z]): ?(.*)$")


@dataclass(frozen=True)
class FusionPair:
    """One training example for the summarizer: prompt ids -> target ids."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]
    domain: str | None
    doc_id: str
    kind: str  # "continuation" | "reply"

    def key(self) -> str:
        """Content hash of the prompt (what drafts are cached under, with the expert set)."""
        return hashlib.sha256(",".join(map(str, self.prompt)).encode()).hexdigest()[:24]


def _uniform(doc_id: str, salt: str, n: int) -> int:
    """A deterministic integer in [0, n) from the document id."""
    h = hashlib.sha256(f"{doc_id}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "big") % n


def continuation_pair(
    doc_id: str,
    ids: Sequence[int],
    *,
    domain: str | None,
    prompt_tokens: int,
    target_tokens: int,
    min_prompt: int = 8,
    min_target: int = 4,
) -> FusionPair | None:
    """Prefix -> true continuation at a cut point drawn from the document id; None if too short."""
    lo, hi = min_prompt, len(ids) - min_target  # cut c: prompt ids[:c], target ids[c:]
    if hi < lo:
        return None
    c = lo + _uniform(doc_id, "cut", hi - lo + 1)
    prompt = tuple(ids[max(0, c - prompt_tokens) : c])
    target = tuple(ids[c : c + target_tokens])
    return FusionPair(prompt, target, domain, doc_id, "continuation")


def dialogue_turns(text: str) -> list[tuple[str, str]]:
    """``[(speaker, text), ...]`` of a text made of ``X: ...`` lines; [] if it is not one."""
    turns = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _TURN.match(line.strip())
        if not m:
            return []
        turns.append((m.group(1), m.group(2).strip()))
    return turns if len(turns) >= 2 else []


def reply_pairs(
    doc_id: str,
    text: str,
    tokenizer: "Tokenizer",
    *,
    domain: str | None,
    prompt_tokens: int,
    target_tokens: int,
    max_pairs: int = 2,
) -> list[FusionPair]:
    """Up to ``max_pairs`` (turn -> reply) pairs from a dialogue, chosen by the document id."""
    turns = dialogue_turns(text)
    idx = [i for i in range(len(turns) - 1) if turns[i][1] and turns[i + 1][1] and turns[i][0] != turns[i + 1][0]]
    idx.sort(key=lambda i: hashlib.sha256(f"{doc_id}:turn:{i}".encode()).hexdigest())
    out = []
    for i in sorted(idx[:max_pairs]):
        (spk, said), (nxt, reply) = turns[i], turns[i + 1]
        prompt = tokenizer.encode(f"{spk}: {said}\n{nxt}:", allow_special=False)[-prompt_tokens:]
        target = tokenizer.encode(" " + reply, allow_special=False)[:target_tokens]
        if prompt and target:
            out.append(FusionPair(tuple(prompt), tuple(target), domain, doc_id, "reply"))
    return out


def fusion_pairs(
    docs: Iterable["Document"],
    tokenizer: "Tokenizer",
    *,
    prompt_tokens: int = 64,
    target_tokens: int = 48,
    max_replies_per_doc: int = 2,
) -> list[FusionPair]:
    """Fusion pairs for every document: replies for dialogues, a continuation for the rest."""
    if prompt_tokens < 1 or target_tokens < 1:
        raise ConfigError(f"prompt_tokens and target_tokens must be >= 1, got {prompt_tokens}, {target_tokens}")
    out: list[FusionPair] = []
    for d in docs:
        replies = reply_pairs(d.id, d.text, tokenizer, domain=d.domain, prompt_tokens=prompt_tokens,
                              target_tokens=target_tokens, max_pairs=max_replies_per_doc)
        if replies:
            out += replies
            continue
        ids = tokenizer.encode(d.text, allow_special=False)
        pair = continuation_pair(d.id, ids, domain=d.domain, prompt_tokens=prompt_tokens, target_tokens=target_tokens,
                                 min_prompt=min(8, prompt_tokens), min_target=min(4, target_tokens))
        if pair is not None:
            out.append(pair)
    return out
