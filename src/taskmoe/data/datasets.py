"""Torch datasets: packed language-model windows, and THE truncation rule for prompt/response pairs.

Torch is used only for tensors and the ``Dataset`` base class; nothing here knows about models.

- :class:`PackedLMDataset`: every document becomes ``<|bos|> tokens <|eos|>``; documents are
  concatenated in order into one stream of N tokens and cut into ``(N - 1) // seq_len``
  windows of ``seq_len + 1`` tokens. Window ``i`` is ``stream[i*seq_len : i*seq_len+seq_len+1]``,
  so consecutive windows share one token and every token after the first is a target exactly
  once (inputs ``w[:-1]``, targets ``w[1:]``). Deterministic, map-style; the tail that does not
  fill a window is dropped.
- **Truncation happens in exactly one place**, :func:`truncate_pair`; the chat datasets
  (:mod:`taskmoe.data.sft`: SFT with an assistant mask, preference pairs) use it through
  :func:`~taskmoe.data.sft.truncate_masked`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.utils.data import Dataset

from taskmoe.progress import progress_bar
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.errors import DataError

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------ packing
def pack_documents(docs_ids: Iterable[Sequence[int]], bos_id: int, eos_id: int) -> torch.Tensor:
    """One int32 stream ``[bos, *doc_0, eos, bos, *doc_1, eos, ...]`` (empty documents skipped)."""
    flat: list[int] = []
    for ids in docs_ids:
        if len(ids):
            flat.append(bos_id)
            flat.extend(ids)
            flat.append(eos_id)
    return torch.tensor(flat, dtype=torch.int32)


def encode_texts(
    tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 512, progress: bool = False
) -> list[list[int]]:
    """Encode texts as plain text (special-token strings are not interpreted), with a progress bar."""
    out: list[list[int]] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("tokenizing", total=len(texts))
        for i in range(0, len(texts), batch_size):
            batch = list(texts[i : i + batch_size])
            out.extend(tokenizer.encode_batch(batch, allow_special=False))
            bar.advance(task, len(batch))
    return out


class PackedLMDataset(Dataset):
    """Fixed windows of ``seq_len + 1`` tokens over a packed token stream (see module docstring)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if tokens.dim() != 1:
            raise DataError(f"PackedLMDataset: tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len < 1:
            raise DataError(f"PackedLMDataset: seq_len must be >= 1, got {seq_len}")
        if tokens.numel() < seq_len + 1:
            raise DataError(
                f"PackedLMDataset: {tokens.numel()} tokens cannot fill one window of seq_len + 1 = {seq_len + 1}"
            )
        self.tokens = tokens.to(torch.int32)
        self.seq_len = seq_len

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], tokenizer: Tokenizer, seq_len: int, *, progress: bool = False
    ) -> "PackedLMDataset":
        ids = encode_texts(tokenizer, texts, progress=progress)
        return cls(pack_documents(ids, tokenizer.bos_id, tokenizer.eos_id), seq_len)

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        i %= n
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1].long()  # (seq_len + 1,)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


# ---------------------------------------------------------------------------- truncation
def truncate_pair(prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """THE truncation rule for prompt/response pairs: fit them into ``B = max_len + 1`` tokens.

    With p = len(prompt), r = len(response), if p + r <= B nothing changes. Otherwise the
    prompt is guaranteed ``min(p, B // 2)`` tokens, the response gets
    ``k_r = min(r, B - min(p, B // 2))`` tokens from its start, and the prompt gets
    ``k_p = min(p, B - k_r)`` tokens: its first token (``<|bos|>``) plus its last ``k_p - 1``
    (the end of the prompt, with the open ``<|assistant|>``, matters most).

    Example: B = 10, p = 8, r = 8 -> k_r = 5, k_p = 5: ``prompt[:1] + prompt[-4:]`` and
    ``response[:5]``. B = 10, p = 20, r = 3 -> k_r = 3, k_p = 7.
    """
    if max_len < 2:
        raise DataError(f"max_len must be >= 2, got {max_len}")
    budget = max_len + 1
    p, r = len(prompt_ids), len(response_ids)
    if p + r <= budget:
        return list(prompt_ids), list(response_ids)
    k_r = min(r, budget - min(p, budget // 2))
    k_p = min(p, budget - k_r)
    prompt = list(prompt_ids[:1]) + list(prompt_ids[p - (k_p - 1) :]) if k_p > 1 else list(prompt_ids[:k_p])
    return prompt, list(response_ids[:k_r])


def masked_example(
    prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate, then shift: ``input_ids = seq[:-1]`` and ``labels = seq[1:]`` with prompt targets at -100."""
    prompt, response = truncate_pair(prompt_ids, response_ids, max_len)
    seq = prompt + response
    target = [IGNORE_INDEX] * len(prompt) + response
    return torch.tensor(seq[:-1], dtype=torch.long), torch.tensor(target[1:], dtype=torch.long)  # (L,), (L,)


def pad_right(rows: Sequence[torch.Tensor], value: int, length: int | None = None) -> torch.Tensor:
    """Stack 1-D tensors into (B, T), padding on the right with ``value``."""
    t = max(r.numel() for r in rows) if length is None else length
    out = torch.full((len(rows), t), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out  # (B, T)
