"""Raw text as next-token windows for continued pretraining of a backbone (the legal expert of ``taskmoe cohesion``).

:class:`TextWindows` has the interface of :class:`~taskmoe.data.sft.SFTDataset` (items
``{"input_ids", "labels"}``, ``lengths()``, ``collate``), so the chat recipes' setup, length-grouped
batches and loss (:func:`~taskmoe.training.recipes.sft.sft_loss`) train on it unchanged; here every
target position is learned (no prompt, no chat template: raw text, as in continued pretraining).

Windows: each document is tokenized on its own (no special tokens) and cut into consecutive
windows of ``max_len + 1`` tokens (``input_ids = w[:-1]``, ``labels = w[1:]``), so no window crosses a
document boundary; a tail shorter than ``min_tokens`` is dropped, and with ``full_only`` every
window shorter than ``max_len + 1`` is (equal-length windows need no padding, which keeps a
per-sequence-routed model's prompt pooling free of pad tokens in batched evaluation).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from taskmoe.data.chat import pad_id_of
from taskmoe.data.sft import LabelledPairs
from taskmoe.errors import DataError

__all__ = ["TextWindows", "doc_text"]


def doc_text(doc: Any) -> str:
    """A document's text: a ``Document`` (``.text``) or a plain string."""
    text = doc if isinstance(doc, str) else getattr(doc, "text", None)
    if not isinstance(text, str):
        raise DataError(f"TextWindows: expected documents with text, got {type(doc).__name__}")
    return text


class TextWindows(LabelledPairs):
    """Documents -> windows of at most ``max_len`` next-token pairs (module docstring)."""

    def __init__(self, docs: Sequence[Any], tokenizer: Any, max_len: int, *, min_tokens: int = 16,
                 full_only: bool = False, max_windows: int | None = None) -> None:
        if max_len < 2:
            raise DataError(f"TextWindows: max_len must be >= 2, got {max_len}")
        self.pad_id = pad_id_of(tokenizer)
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []
        need = max_len + 1 if full_only else max(2, min_tokens)
        for d in docs:
            ids = tokenizer.encode(doc_text(d), allow_special=False)
            for a in range(0, max(1, len(ids) - 1), max_len):
                w = ids[a : a + max_len + 1]
                if len(w) < need:
                    continue
                t = torch.tensor(w, dtype=torch.long)
                self.items.append((t[:-1], t[1:]))
                if max_windows is not None and len(self.items) >= max_windows:
                    return
        if not self.items:
            raise DataError(f"TextWindows: no document gives a window of {need} tokens")
