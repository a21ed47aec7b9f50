"""The Fuse stage: the summarizer reads each row's prompt and drafts and writes the answer, one decode.

Each live row's fusion prompt is built by :meth:`FusionFormat.build` (drafts most confident
first, cut to ``max_len`` by the one truncation rule; the trace's ``fusion`` says what was kept),
its adapter is chosen from the intent the Assess stage detected (:func:`uses_adapter`), and ALL
rows decode together in one :func:`~taskmoe.inference.generate.generate_rows` call through
:class:`~taskmoe.inference.rowwise.AdapterRowsLM`, the adapter flag travelling with each row as
side data. Each row decodes under its own config and its own generator (seeded from its
``seed``), so sampled rows with different seeds share the batch and each equals its solo run.
Tokens stream as stage ``"answer"``; a row whose control says stop leaves the decode at once.
Timed as ``summarize``.

:meth:`Fuse.open` gives the same stage for continuous batching (:class:`FuseSession`): one
step-wise summarizer decode that rows of later calls join between steps (same fusion prompt,
config, generator and adapter flag per row, so each equals its solo run).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from taskmoe.inference.generate import GenerationConfig, generate_rows
from taskmoe.inference.rowwise import AdapterRowsLM
from taskmoe.inference.stages.base import Call, Row
from taskmoe.inference.stages.joined import AnswerDecode
from taskmoe.summarizer.fuser import FusionFormat
from taskmoe.summarizer.intent import IntentResult

__all__ = ["Fuse", "FuseSession", "uses_adapter"]


def uses_adapter(intent: IntentResult | None, cfg: Any, adapters: list[str]) -> bool:
    """True when ``intent`` switches the summarizer's adapter ``cfg.adapter`` on (and it is loaded)."""
    return intent is not None and intent.label == cfg.adapter_intent and cfg.adapter in adapters


class Fuse:
    """Summarize the live rows with ``summarizer`` (its loaded LoRA adapters named in ``adapters``)."""

    name = "fuse"

    def __init__(self, summarizer: nn.Module, fmt: FusionFormat, eos_id: int, adapters: list[str]) -> None:
        self.summarizer, self.fmt, self.eos_id, self.adapters = summarizer, fmt, int(eos_id), list(adapters)

    def inputs(self, todo: list[Row]) -> tuple[list[list[int]], list[GenerationConfig], list[bool]]:
        """Each row's fusion prompt (trace ``fusion`` and ``adapter`` written), answer config, and
        whether its adapter runs (the decoder's side data)."""
        fused = []
        for r in todo:
            seq = self.fmt.build(r.prompt, r.drafts, max_len=r.cfg.max_len)
            r.trace.fusion.update({"experts": seq.experts, "input_tokens": len(seq.ids),
                                   "truncated": {k: list(v) for k, v in seq.truncated.items()}, "dropped": seq.dropped})
            r.adapter = r.cfg.adapter if uses_adapter(r.intent, r.cfg, self.adapters) else None
            r.trace.adapter = r.adapter
            fused.append(seq.ids)
        return fused, [r.cfg.generation(self.eos_id) for r in todo], [r.adapter is not None for r in todo]

    def decoder(self, adapter: str | None) -> nn.Module:
        """What decodes the answers: the summarizer with ``adapter`` on the rows whose side data is True."""
        return AdapterRowsLM(self.summarizer, adapter)

    def __call__(self, rows: list[Row], call: Call) -> list[Row]:
        todo = call.live(rows, "answer")
        fused, cfgs, use = self.inputs(todo)
        if todo:
            with call.clock("summarize"):
                outs = generate_rows(self.decoder(call.cfg.adapter if any(use) else None), fused, cfgs,
                                     emits=[call.emit(r, "answer") for r in todo], side=use)
            for r, o in zip(todo, outs):
                r.answer = o.tokens
        return rows

    def open(self) -> "FuseSession":
        """This stage for continuous batching: rows of later calls join the summarizer's decode between steps."""
        return FuseSession(self)


class FuseSession(AnswerDecode):
    """The summarizer's decode as one step-wise session over every call's rows (see :mod:`.joined`).

    The adapter wrapper names the call's adapter whenever the summarizer has it loaded (a row
    without the adapter gets exactly the base output either way), so rows that need it and rows
    that do not join the same decode.
    """

    timing = "summarize"

    def add(self, rows: list[Row], call: Call) -> list[Row]:
        st = self.stage
        todo = call.live(rows, "answer")
        fused, cfgs, use = st.inputs(todo)
        adapter = call.cfg.adapter if call.cfg.adapter in st.adapters else None
        self._decode(adapter, lambda: st.decoder(adapter), todo, call, fused, cfgs, [None] * len(todo),
                     stage="answer", side=use)
        return [r for r in rows if all(r is not t for t in todo)]
