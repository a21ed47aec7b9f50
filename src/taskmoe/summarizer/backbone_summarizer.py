"""``BackboneSummarizer``: the IMoE summarizer as a fusion LoRA adapter of the shared, frozen backbone.

The backbone system keeps one backbone in memory; the experts are its LoRA adapters and so is the
summarizer (the MoA-style aggregator): adapter ``fusion`` reads the prompt and the experts' drafts
(:class:`~taskmoe.summarizer.backbone_format.BackboneFusionFormat`) and writes the answer. Its
coding adapter is *a LoRA of that summarizer*: a second adapter of the same shape, trained from the
fusion adapter's weights on code-domain fusion examples, that replaces ``fusion`` on the rows whose
intent is coding. Inside the backbone they are named ``summarizer_fusion`` and ``summarizer_code``
(:func:`adapter_name`), so no expert folder name can collide with them. Both are plain PEFT adapters of the backbone (``peft.PeftModel`` loads either).

Design choices:

- **Held like an expert.** As :class:`~taskmoe.experts.adapter_expert.AdapterExpert`, the backbone
  is kept outside the module tree (shared, charged to nobody) and the registered parameters are the
  adapters' A and B; every forward holds the backbone's :func:`~taskmoe.models.switch_lock.switch_lock`.
- **Its own switch** (the protocol of :mod:`taskmoe.summarizer.switch`): ``switch_adapter("code",
  rows)`` runs ``code`` on ``rows`` and ``fusion`` on the others in ONE forward
  (:func:`~taskmoe.layers.multi_lora.use_row_adapters`, the segmented mixed-adapter path; exact
  against each row alone); ``switch_adapter(None)`` (the default) is ``fusion`` on every row.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from taskmoe.errors import ConfigError
from taskmoe.experts.adapter_expert import AdapterExpert, adapter_parameters
from taskmoe.layers.lora import use_adapter
from taskmoe.layers.multi_lora import use_row_adapters
from taskmoe.models.switch_lock import switch_lock

__all__ = ["BackboneSummarizer", "FUSION_ADAPTER", "adapter_name"]

FUSION_ADAPTER = "summarizer_fusion"
"""The fusion adapter's name inside the shared backbone (prefixed: expert adapters are named by their folders)."""


def adapter_name(public: str) -> str:
    """The name inside the backbone of the summarizer's adapter ``public`` (``code`` -> ``summarizer_code``)."""
    return f"summarizer_{public}"


class BackboneSummarizer(AdapterExpert):
    """The backbone with adapter ``fusion`` on, ``adapters`` switchable per row (module docstring)."""

    def __init__(self, base: nn.Module, fusion: str = FUSION_ADAPTER, adapters: Sequence[str] = ()) -> None:
        super().__init__(base, fusion)  # the backbone held outside the tree; ``lora``: the fusion adapter's A/B
        for public in adapters:
            extra = adapter_parameters(base, adapter_name(public))
            if not extra:
                raise ConfigError(f"backbone summarizer: the backbone has no adapter named {adapter_name(public)!r}")
            self.lora.update({f"{public}__{k}": p for k, p in extra.items()})
        self.fusion, self.extra = fusion, list(adapters)  # public names; adapter_name() gives the backbone's
        self._switch: tuple[str | None, Tensor | None] = (None, None)

    def adapter_names(self) -> list[str]:
        """The adapters that may replace ``fusion`` on some rows (e.g. ``["code"]``)."""
        return list(self.extra)

    @contextlib.contextmanager
    def switch_adapter(self, name: str | None, rows: Tensor | None = None) -> Iterator["BackboneSummarizer"]:
        """Adapter ``name`` on ``rows`` (bool (B,), None = all), ``fusion`` elsewhere; restored on exit."""
        if name is not None and name not in self.extra:
            raise ConfigError(f"backbone summarizer has no adapter {name!r} (it has {self.extra})")
        saved = self._switch
        self._switch = (name, None if rows is None else rows.to(torch.bool).reshape(-1))
        try:
            yield self
        finally:
            self._switch = saved

    def forward(self, input_ids: Tensor, state: Any = None, *, logits_to_keep: int = 0) -> Any:
        name, rows = self._switch
        if name is not None and rows is not None:
            if rows.numel() != input_ids.shape[0]:
                raise ConfigError(f"backbone summarizer: adapter rows mask has {rows.numel()} rows, batch has "
                                  f"{input_ids.shape[0]}")
            if bool(rows.all()):
                rows = None
            elif not bool(rows.any()):
                name = None
        name = None if name is None else adapter_name(name)
        base = self.base
        with switch_lock(base):
            if name is not None and rows is not None:
                ctx: Any = use_row_adapters(base, [name if r else self.fusion for r in rows.tolist()])
            else:
                ctx = use_adapter(base, name or self.fusion)
            with ctx:
                return base(input_ids, state, logits_to_keep=logits_to_keep)
