"""The summarizer's fusion prompt on a pretrained backbone: the question and the drafts as one chat turn.

A backbone's tokenizer (e.g. SmolLM2's) has none of taskmoe's ``<|expert|>``/``<|draft|>`` tokens,
and its instruct model already follows its own chat template, so the MoA-style aggregator reads
one user turn and writes the assistant turn (``P`` prompt, ``D_i`` drafts, ``A`` answer)::

    <template: system turn, user header> P
    "\\n\\nDrafts by the routed experts, most confident first:"
    "\\n[legal, confidence 0.87]\\n" D_1
    "\\n[code, confidence 0.13]\\n" D_2
    "\\n\\nWrite the answer." <template: end of user turn, assistant header> A <eos>

Design choices:

- **Same interface as** :class:`~taskmoe.summarizer.fuser.FusionFormat` (``build``, ``head``,
  ``encode``, ``eos_id``, ``max_len``) and the same result (:class:`~taskmoe.summarizer.fuser.FusedSequence`),
  so the Fuse and Assess stages, the recipes and :mod:`taskmoe.eval.fusion` use either unchanged.
- **The template's own ids, split once.** The chat template is rendered around a placeholder
  (:meth:`BackboneTokenizer.encode_chat`) into ``pre`` (everything before the user content) and
  ``post`` (end of the user turn + the generation prompt); contents are ids spliced in between,
  so no draft text can forge a template token and no BPE merge crosses a section boundary.
- **Most confident first, confidence as two-decimal text**, the budget and the truncation are
  FusionFormat's: the same :func:`~taskmoe.summarizer.fuser.order_drafts`,
  :func:`~taskmoe.summarizer.fuser.fit_budget` (question, template and answer never cut;
  drafts water-filled, least confident dropped whole when even headers do not fit). The drafts
  section's frame (intro line + instruction) counts as fixed while any draft is kept; when none
  fits the sequence is the bare question, exactly as built without drafts.
- **The answer ends with the tokenizer's eos** (SmolLM2: ``<|im_end|>``), which is where the
  template closes the assistant turn and where decoding stops; the template's trailing newline
  after it is not part of the sequence. Loss only on the answer and that eos
  (:meth:`FusedSequence.targets`).

Glossary as in :mod:`taskmoe.summarizer.fuser`: ``L_max`` budget, ``h_i`` header length of draft
``i`` (its header text), ``d_i`` draft length, ``k_i`` tokens kept.
"""

from __future__ import annotations

from typing import Any, Sequence

from taskmoe.errors import ConfigError
from taskmoe.summarizer.fuser import Draft, FusedSequence, fit_budget, order_drafts, place_drafts

__all__ = ["BackboneFusionFormat", "backbone_header_text", "DRAFTS_INTRO", "INSTRUCTION"]

DRAFTS_INTRO = "\n\nDrafts by the routed experts, most confident first:"
INSTRUCTION = "\n\nWrite the answer."
_MARK = "\ue000fusion\ue001"  # a placeholder no template or text produces


def backbone_header_text(expert: str, confidence: float) -> str:
    """The text before draft ``i``: ``"\\n[legal, confidence 0.87]\\n"``."""
    return f"\n[{expert}, confidence {confidence:.2f}]\n"


class BackboneFusionFormat:
    """Builds fusion prompts through a backbone tokenizer's chat template (module docstring)."""

    def __init__(self, tokenizer: Any, max_len: int = 1024) -> None:
        if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "encode_chat"):
            raise ConfigError("BackboneFusionFormat needs a backbone tokenizer with a chat template "
                              "(taskmoe.data.backbone_tokenizer.BackboneTokenizer)")
        if max_len < 8:
            raise ConfigError(f"fusion max_len must be >= 8, got {max_len}")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.pre, self.post = self._split(add_generation_prompt=True)
        self.intro, self.instruction = self.encode(DRAFTS_INTRO), self.encode(INSTRUCTION)

    def _split(self, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        """(ids before the user content, ids after it) of a one-user-turn chat."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt)
        if text.count(_MARK) != 1:
            raise ConfigError("the backbone's chat template does not place the user content verbatim once; "
                              "BackboneFusionFormat cannot splice ids into it")
        before, after = text.split(_MARK)
        return list(self.tokenizer.encode(before)), list(self.tokenizer.encode(after))

    def encode(self, text: str) -> list[int]:
        """Plain-text ids (template tokens in ``text`` are encoded as text, never as the token)."""
        return list(self.tokenizer.encode(text, allow_special=False))

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_id)

    def head(self, prompt_ids: Sequence[int]) -> list[int]:
        """What the intent head reads: the prompt as the user turn, no drafts (``pre + P + post``)."""
        return [*self.pre, *map(int, prompt_ids), *self.post]

    def build(self, prompt_ids: Sequence[int], drafts: Sequence[Draft], answer_ids: Sequence[int] | None = None, *,
              max_len: int | None = None) -> FusedSequence:
        """The fusion sequence; with ``answer_ids`` (training) it ends ``A <eos>``, without (inference)
        it ends with the assistant header and the summarizer continues from there."""
        max_len = self.max_len if max_len is None else max_len
        ordered = order_drafts(drafts)
        headers = [self.encode(backbone_header_text(d.expert, d.confidence)) for d in ordered]
        answer = [] if answer_ids is None else [*map(int, answer_ids), self.eos_id]
        head = [*self.pre, *map(int, prompt_ids)]
        bare = len(head) + len(self.post) + len(answer)  # never cut: the question, the template, the answer
        frame = len(self.intro) + len(self.instruction)  # what any drafts section adds besides its headers
        if ordered and bare + frame <= max_len:
            kept = fit_budget(bare + frame, [len(h) for h in headers], [len(d.ids) for d in ordered], max_len)
        else:
            kept = [None] * len(ordered) + fit_budget(bare, [], [], max_len)  # (raises when the question alone is over)
        with_drafts = any(k is not None for k in kept)
        intro = self.intro if with_drafts else []
        tail = [*self.instruction, *self.post] if with_drafts else list(self.post)
        seq = place_drafts(head + intro, ordered, headers, kept)
        seq.ids += tail
        seq.answer_start = len(seq.ids)
        seq.ids += answer
        return seq

    def text(self, prompt: str, drafts: Sequence[tuple[str, float, str]]) -> str:
        """The user turn's content as text (for traces and docs; untruncated)."""
        parts = [prompt]
        if drafts:
            parts.append(DRAFTS_INTRO)
            for name, conf, text in sorted(drafts, key=lambda d: (-float(d[1]), d[0])):
                parts += [backbone_header_text(name, conf), text]
            parts.append(INSTRUCTION)
        return "".join(parts)
