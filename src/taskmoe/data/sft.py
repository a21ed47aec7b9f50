"""SFT and preference datasets rendered with the tokenizer's chat template, and length-grouped batches.

Every chat goes through :func:`taskmoe.data.chat.render_chat` (ids + assistant mask), so the same
code serves taskmoe's tokenizer and a backbone's Jinja template. Items are already shifted:
``input_ids = seq[:-1]`` and ``labels = seq[1:]`` with ``-100`` wherever the target is not an
assistant token, so the loss is ``cross_entropy(logits, labels, ignore_index=-100)``.

- :class:`SFTDataset`: one conversation per item, the loss on **every** assistant turn
  (content and end-of-turn token), never on system/user text or role headers.
- :class:`PreferenceDataset`: a prompt and two completions; each side is the prompt plus one
  final assistant turn, and only that turn is a target (DPO scores ``log pi(y | x)`` of the
  completion alone). Collate pads both sides to one length, so they stack into ``(2B, T)``.
- **Truncation happens in one place**: :func:`truncate_masked` applies
  :func:`~taskmoe.data.datasets.truncate_pair` to the positions before the first target
  (the prompt) and from it on (the rest), keeping ``<|bos|>``, the end of the prompt and the
  start of the answer.
- **Held-out split** (:func:`split_examples`): a seeded permutation shared by the trainers and
  the evaluation, so ``eval`` scores exactly the examples training held out.
- **Length-grouped batches** (:func:`length_grouped_batches`, :class:`GroupedBatches`): shuffle
  with a seed, cut into mega-batches of ``batch_size * mega`` examples, sort each by length and cut
  it into batches, so a batch pads to a similar length (HF's ``LengthGroupedSampler`` idea) while
  the order stays random. A :class:`GroupedBatches` item *is* a batch; train it with the loop's
  ``batch_size = 1`` (the recipes do). Packing several chats into one row is not used because our
  models have no per-document attention mask: packed chats would attend to each other.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from taskmoe.data.chat import pad_id_of, render_chat
from taskmoe.data.datasets import IGNORE_INDEX, pad_right, truncate_pair
from taskmoe.data.formats import PreferenceExample, SFTExample
from taskmoe.errors import DataError

Chat = Sequence[Mapping[str, str]]


def truncate_masked(ids: Sequence[int], mask: Sequence[bool], max_len: int) -> tuple[list[int], list[bool]]:
    """Fit ``ids``/``mask`` into ``max_len + 1`` tokens with THE truncation rule (module docstring)."""
    first = next((i for i, m in enumerate(mask) if m), None)
    if first is None:
        raise DataError("chat has no assistant token to learn")
    keep_p, keep_r = truncate_pair(range(first), range(first, len(ids)), max_len)
    keep = list(keep_p) + list(keep_r)
    return [ids[i] for i in keep], [bool(mask[i]) for i in keep]


def shifted(ids: Sequence[int], mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids = ids[:-1]``, ``labels[t] = ids[t + 1]`` where ``mask[t + 1]`` else -100."""
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids[1:], mask[1:])]
    return torch.tensor(ids[:-1], dtype=torch.long), torch.tensor(labels, dtype=torch.long)  # (L,), (L,)


def as_chat(example: SFTExample | Chat) -> list[dict[str, str]]:
    """An SFT example as a full conversation (its prompt messages plus the assistant response)."""
    if isinstance(example, SFTExample):
        return [dict(m) for m in example.messages] + [{"role": "assistant", "content": example.response}]
    return [dict(m) for m in example]


class _ChatItems(Dataset):
    """Shared storage, lengths and padding of the two datasets."""

    items: list[Any]
    pad_id: int

    def __len__(self) -> int:
        return len(self.items)

    def _start(self, examples: Sequence[Any], tokenizer: Any, max_len: int) -> None:
        """Check the inputs (``DataError`` naming the dataset) and set ``pad_id`` and an empty ``items``."""
        if not examples:
            raise DataError(f"{type(self).__name__}: no examples")
        if max_len < 2:
            raise DataError(f"max_len must be >= 2, got {max_len}")
        self.pad_id = pad_id_of(tokenizer)
        self.items = []

    def _pad(self, rows: list[dict[str, torch.Tensor]], prefix: str, t: int | None = None) -> dict[str, torch.Tensor]:
        ids = [r[f"{prefix}input_ids"] for r in rows]
        return {
            f"{prefix}input_ids": pad_right(ids, self.pad_id, t),  # (B, T)
            f"{prefix}labels": pad_right([r[f"{prefix}labels"] for r in rows], IGNORE_INDEX, t),  # (B, T)
            f"{prefix}attention_mask": pad_right([torch.ones_like(x) for x in ids], 0, t).bool(),  # (B, T)
        }


class LabelledPairs(_ChatItems):
    """Items ``(input_ids (L,), labels (L,))`` -> ``{"input_ids", "labels"}``, with lengths and padding
    (the shape of :class:`SFTDataset` and :class:`~taskmoe.data.text_windows.TextWindows`)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        input_ids, labels = self.items[i]
        return {"input_ids": input_ids, "labels": labels}

    def lengths(self) -> list[int]:
        return [x.numel() for x, _ in self.items]

    def collate(self, batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest item: input_ids with pad_id, labels with -100; plus attention_mask."""
        return self._pad(list(batch), "")


class SFTDataset(LabelledPairs):
    """Conversations (or :class:`SFTExample`) -> ``{"input_ids": (L,), "labels": (L,)}``, L <= max_len."""

    def __init__(self, examples: Sequence[SFTExample | Chat], tokenizer: Any, max_len: int) -> None:
        self._start(examples, tokenizer, max_len)
        for n, ex in enumerate(examples):
            r = render_chat(tokenizer, as_chat(ex))
            if not r.spans:
                raise DataError(f"SFT example {n}: no assistant turn to learn")
            self.items.append(shifted(*truncate_masked(r.ids, r.assistant_mask, max_len)))


class PreferenceDataset(_ChatItems):
    """Prompt + chosen / rejected completions, each side rendered as the prompt plus one assistant turn."""

    def __init__(self, examples: Sequence[PreferenceExample], tokenizer: Any, max_len: int) -> None:
        self._start(examples, tokenizer, max_len)
        for ex in examples:
            sides = []
            for answer in (ex.chosen, ex.rejected):
                r = render_chat(tokenizer, [*ex.messages, {"role": "assistant", "content": answer}])
                start, end = r.spans[-1]
                mask = [start <= t < end for t in range(len(r.ids))]  # only the final turn is scored
                sides.append(shifted(*truncate_masked(r.ids, mask, max_len)))
            self.items.append(tuple(sides))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        (ci, cl), (ri, rl) = self.items[i]
        return {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl}

    def lengths(self) -> list[int]:
        return [max(c.numel(), r.numel()) for (c, _), (r, _) in self.items]

    def collate(self, batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad chosen and rejected to ONE common length T so they can be stacked into (2B, T)."""
        rows = list(batch)
        t = max(max(b["chosen_input_ids"].numel(), b["rejected_input_ids"].numel()) for b in rows)
        return {**self._pad(rows, "chosen_", t), **self._pad(rows, "rejected_", t)}


def split_examples(examples: Sequence[Any], val: int, seed: int, limit: int | None = None) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)`` by a seeded permutation: the first ``val`` are held out, the next ``limit``
    (or all) train. The trainers and the evaluation call it with the same seed, so they agree."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held, rest = order[:val], order[val:]
    rest = rest[:limit] if limit else rest
    if not rest:
        raise DataError(f"{len(examples)} examples leave none to train on after holding out {val}")
    return [examples[i] for i in rest], [examples[i] for i in held]



# ----------------------------------------------------------------------- length grouping
def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 16) -> list[list[int]]:
    """Index batches of similar length in a seeded random order (module docstring); the last may be short."""
    if batch_size < 1 or mega < 1:
        raise DataError(f"batch_size and mega must be >= 1, got {batch_size}, {mega}")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    size = batch_size * mega
    batches: list[list[int]] = []
    for a in range(0, len(order), size):
        chunk = sorted(order[a : a + size], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return batches


class GroupedBatches(Dataset):
    """A dataset whose item ``i`` is batch ``i`` of :func:`length_grouped_batches` over ``data``."""

    def __init__(self, data: SFTDataset | PreferenceDataset, batch_size: int, seed: int = 0, mega: int = 16) -> None:
        self.data = data
        self.batches = length_grouped_batches(data.lengths(), batch_size, seed, mega)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        return [self.data[j] for j in self.batches[i]]

    def collate(self, groups: Sequence[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        return self.data.collate([row for g in groups for row in g])

    def padding_fraction(self) -> float:
        """Share of padded positions over all batches (what grouping saves, vs random batches)."""
        lengths = self.data.lengths()
        padded = sum(len(b) * max(lengths[j] for j in b) for b in self.batches)
        return 1.0 - sum(lengths) / padded if padded else 0.0
