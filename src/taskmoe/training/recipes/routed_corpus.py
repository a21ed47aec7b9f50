"""A corpus routed by a run's router, cut into each expert's training windows (shared by the
experts recipes: :mod:`.experts` for our own expert LMs, :mod:`.backbone_experts` for adapter
experts on a backbone).

:func:`route_corpus` encodes the train and validation splits with the router's tokenizer and
routes every document (:func:`taskmoe.experts.assign.route_documents`);
:meth:`RoutedCorpus.windows` packs one expert's routed documents into ``seq_len`` windows
(:func:`taskmoe.data.datasets.pack_documents`, BOS/EOS between documents) and takes evenly spaced
validation windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from taskmoe.data.datasets import PackedLMDataset, pack_documents
from taskmoe.errors import ConfigError, DataError
from taskmoe.experts.assign import route_documents


def _windows(ids: Sequence[Sequence[int]], tok: Any, seq_len: int) -> list[torch.Tensor]:
    stream = pack_documents(ids, tok.bos_id, tok.eos_id)
    if stream.numel() < seq_len + 1:
        return []
    ds = PackedLMDataset(stream, seq_len)
    return [ds[i] for i in range(len(ds))]


def _evenly(items: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


@dataclass
class RoutedCorpus:
    """A corpus's token ids routed by a run's router: the experts to train and each one's documents."""

    names: list[str]
    train_ids: list[list[int]]
    val_ids: list[list[int]]
    assignment: Any
    val_assignment: Any

    def windows(self, name: str, tok: Any, seq_len: int, val_windows: int) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """``(documents, train windows, validation windows)`` of expert ``name``: its routed documents packed
        into ``seq_len`` windows (at least 2, else :class:`DataError`), and at most ``val_windows`` evenly
        spaced validation windows."""
        idx = self.assignment.docs[name]
        windows = _windows([self.train_ids[i] for i in idx], tok, seq_len)
        if len(windows) < 2:
            raise DataError(f"expert {name!r}: its {len(idx)} routed training document(s) give {len(windows)} window(s) "
                            f"of {seq_len} tokens; need at least 2 (lower --seq-len or add data)")
        val = [] if self.val_assignment is None else _evenly(
            _windows([self.val_ids[i] for i in self.val_assignment.docs[name]], tok, seq_len), val_windows)
        return len(idx), windows, val


def route_corpus(router: Any, corpus: Any, experts: Sequence[str] | None = None, *, progress: bool = True,
                 log: Callable[[str], None] = lambda s: None) -> RoutedCorpus:
    """Encode the corpus's train/validation splits with the router's tokenizer and route every document;
    ``experts`` (default: every router category) must be router categories (:class:`ConfigError`)."""
    names = list(experts) if experts else list(router.categories)
    unknown = [n for n in names if n not in router.categories]
    if unknown:
        raise ConfigError(f"unknown expert(s) {unknown}; the router's categories are {router.categories}")
    tok = router.tokenizer
    train_ids = tok.encode_batch([d.text for d in corpus.train], allow_special=False)
    val_ids = tok.encode_batch([d.text for d in corpus.validation], allow_special=False) if corpus.validation else []
    if not train_ids:
        raise DataError("the corpus's train split is empty")
    assignment, _ = route_documents(router, train_ids, progress=progress)
    val_assign = route_documents(router, val_ids)[0] if val_ids else None
    log(f"routed {assignment.total} training documents: {assignment.summary()}")
    return RoutedCorpus(names, train_ids, val_ids, assignment, val_assign)
