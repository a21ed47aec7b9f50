"""``MixedAdapterLM``: one backbone, many LoRA adapters, one batched forward where every row uses its own.

Sequence routing knows each row's expert after the prompt, once. This wrapper carries that choice
**in the decoding state** (:class:`~taskmoe.layers.state.TaggedState`: the row's adapter id moves
with the row through generate's prefill-by-length, concatenation and dropping of finished rows),
and every forward runs the backbone once under :func:`~taskmoe.layers.multi_lora.use_row_adapters`:
each LoRA layer computes the base projection for all rows and each adapter's low-rank update on
its contiguous segment of rows (:mod:`taskmoe.ops.segmented_lora`; rows are sorted by adapter once
per forward, the plan shared by all layers).

Use with the one decoding loop::

    lm = MixedAdapterLM(backbone)                      # every adapter injected/loaded into it
    generate(lm, prompts, cfg, side=["legal", "code", None, "legal"])   # None = the base model

or for a stateless pass (evaluation): ``lm(ids, adapters=[...])``. Exact against each row run alone
with its adapter (tested, prefill and decode, ragged prompts).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from taskmoe.errors import ConfigError
from taskmoe.layers.lora import adapter_names, lora_layers
from taskmoe.layers.multi_lora import RowAdapters, use_row_adapters
from taskmoe.layers.state import TaggedState
from taskmoe.models.model import LMOutput

__all__ = ["MixedAdapterLM"]


class MixedAdapterLM(nn.Module):
    """``model`` whose rows each run with their own LoRA adapter (see the module docstring)."""

    def __init__(self, model: nn.Module, adapters: Sequence[str] | None = None) -> None:
        super().__init__()
        known = adapter_names(model)
        self.names = list(known if adapters is None else adapters)
        missing = [n for n in self.names if n not in known]
        if missing:
            raise ConfigError(f"MixedAdapterLM: adapters {missing} are not in the model (it has {known})")
        self.model = model
        self._index = {n: i for i, n in enumerate(self.names)}
        self._layers = lora_layers(model)  # every layer any of these adapters is on (they all exist already)
        self._rows: tuple[Tensor, RowAdapters] | None = None  # the last ids tensor and its plan (decode reuses it)

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def supports_padded_prefill(self) -> bool:
        return bool(getattr(self.model, "supports_padded_prefill", False))

    def adapter_ids(self, per_row: Sequence[str | None], device: Any = None) -> Tensor:
        """(B,) int64 ids of adapter names per row (None -> -1, the base model)."""
        bad = sorted({n for n in per_row if n is not None and n not in self._index})
        if bad:
            raise ConfigError(f"MixedAdapterLM: unknown adapters {bad} (known: {self.names})")
        return torch.tensor([-1 if n is None else self._index[n] for n in per_row], dtype=torch.long, device=device)

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None, *,
                   side: Sequence[str | None] | None = None) -> TaggedState:
        """The backbone's state plus each row's adapter (``side``: one name or None per row)."""
        if side is None or len(side) != batch_size:
            raise ConfigError(f"MixedAdapterLM needs one adapter name (or None) per row: decode with generate(..., "
                              f"side=names); got {None if side is None else len(side)} for {batch_size} rows")
        inner = self.model.init_state(batch_size, device, dtype)
        return TaggedState(inner, self.adapter_ids(side, device or next(self.model.parameters()).device))

    def forward(self, input_ids: Tensor, state: TaggedState | None = None, *, logits_to_keep: int = 0,
                adapters: Sequence[str | None] | None = None, lengths: Tensor | None = None) -> LMOutput:
        """With a state: continue decoding (adapters from the state). Without: ``adapters`` per row."""
        if state is None:
            if adapters is None:
                raise ConfigError("MixedAdapterLM: a stateless pass needs adapters=[name or None per row]")
            ids = self.adapter_ids(adapters, input_ids.device)
        else:
            ids = state.tags
        if self._rows is None or self._rows[0] is not ids:
            self._rows = (ids, RowAdapters(self.names, ids))  # planned once while the state's rows stay the same
        with use_row_adapters(self.model, self._rows[1], layers=self._layers):
            kw = {} if lengths is None else {"lengths": lengths}
            out = self.model(input_ids, None if state is None else state.inner, logits_to_keep=logits_to_keep, **kw)
        return LMOutput(out.logits, None if state is None else TaggedState(out.state, ids), out.hidden)
