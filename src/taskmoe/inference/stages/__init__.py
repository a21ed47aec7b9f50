"""The IMoE pipeline as stages, each with one batched interface: ``stage(rows, call) -> rows``.

Summarizer mode: :class:`Route` -> :class:`Draft` -> :class:`Crosstalk` -> :class:`Assess` ->
:class:`Fuse`; experts-only mode: :class:`Route` -> :class:`Ensemble`.
:class:`~taskmoe.inference.pipeline.System` only composes them. The shared types (:class:`Row`,
:class:`Control`, :class:`Call`, the ``on_token`` callback) are in :mod:`.base`. For continuous batching
the decode stages open step-wise sessions (:mod:`.joined`) that :class:`PipelineSession` composes.
"""

from taskmoe.inference.stages.assess import Assess, prompt_head, summarizer_features
from taskmoe.inference.stages.base import STAGES, Call, Clock, Control, ExpertStage, OnToken, RecordingStore, Row, Stage
from taskmoe.inference.stages.crosstalk import Crosstalk, CrosstalkRunner
from taskmoe.inference.stages.draft import Draft, draft_config, draft_generator
from taskmoe.inference.stages.ensemble import Ensemble
from taskmoe.inference.stages.fuse import Fuse, uses_adapter
from taskmoe.inference.stages.route import Route
from taskmoe.inference.stages.session import PipelineSession

__all__ = [
    "Assess", "Call", "Clock", "Control", "Crosstalk", "CrosstalkRunner", "Draft", "Ensemble", "ExpertStage", "Fuse", "OnToken",
    "PipelineSession", "RecordingStore", "Route", "Row", "STAGES", "Stage", "draft_config", "draft_generator", "prompt_head",
    "summarizer_features", "uses_adapter",
]
