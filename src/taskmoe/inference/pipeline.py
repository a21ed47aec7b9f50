"""The IMoE pipeline, text in: :class:`System` composes the stages of :mod:`taskmoe.inference.stages`.

:class:`System` holds the trained parts (built elsewhere and injected: tokenizer, router, expert
store, summarizer with its adapters, intent head, cross-talk runner) and answers prompts by
passing one list of :class:`~taskmoe.inference.stages.Row` through the stages, each of which
works on the whole batch at once:

- summarizer mode: **Route** (one routing pass: confidences, c_S, t_C, selected experts,
  fallback, cross-talk pair) -> **Draft** (one decode per selected expert over its rows; the
  store loads an expert lazily and the trace says loaded/cached) -> **Crosstalk** (one batched
  dialogue per flagged expert pair) -> **Assess** (intent of every prompt and draft in one pass,
  disagreement; above the threshold the answer is a clarification question) -> **Fuse** (one
  summarizer decode over every remaining row, the coding adapter on exactly the rows with coding
  intent);
- experts-only mode (no summarizer): **Route** -> **Ensemble** (the confidence-weighted mixture of
  the selected experts, one decode per expert set).

Control and streaming (:meth:`System.generate_ids`, :meth:`System.stream`): each row may carry a
:class:`~taskmoe.inference.stages.Control` (``cancel()``, an external ``is_cancelled()``, a
``deadline`` in :func:`time.monotonic` seconds), checked before every stage and after every
decode step of that row in every stage: a stopped row leaves the batch before the next step and
keeps what it produced (``trace.stopped`` says why and where). ``on_token(row, token, stage,
expert)`` receives every token as it is produced (drafts, cross-talk turns, then the answer or the
clarification). Per-row ``options`` override the decoding fields of single rows; every row decodes
with its own generator seeded from its ``seed``, so rows with different seeds share one batch.

Continuous batching (:meth:`System.open_session`): the same stages with the decode stages (Draft,
Fuse, Ensemble) run step-wise, so the rows of a later call join the running decodes between steps
instead of waiting for the whole call (:mod:`taskmoe.inference.stages.session`; the server's IMoE
backend drives it); a joined row's answer equals its solo run.

Exactness: every stage is row-independent (a row's greedy tokens do not depend on its
batch-mates; a sampled row draws from its own generator), so :meth:`System.generate_batch` gives
each prompt exactly the answer :meth:`System.generate` gives it alone (tested).

Glossary: c_S complexity, t_C selection threshold, t_CT cross-talk threshold (router);
D disagreement score (summarizer.disagreement).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from taskmoe.config import Config, check, doc
from taskmoe.errors import ConfigError, RequestError
from taskmoe.experts.store import ExpertStore
from taskmoe.inference.generate import GenerationConfig
from taskmoe.inference.stages import (
    Assess,
    Call,
    Clock,
    Control,
    Crosstalk,
    CrosstalkRunner,
    Draft,
    Ensemble,
    Fuse,
    OnToken,
    RecordingStore,
    Route,
    Row,
    Stage,
    draft_generator,
    prompt_head,
)
from taskmoe.inference.stages.session import PipelineSession
from taskmoe.inference.system_parts import SystemParts
from taskmoe.inference.stream import PipelineStream, TokenEvent
from taskmoe.inference.trace import Answer, ExpertUse, Trace
from taskmoe.router.policy import RoutingDecision
from taskmoe.summarizer.fuser import FusionFormat
from taskmoe.summarizer.disagreement import DisagreementConfig
from taskmoe.summarizer.intent import IntentClassifier
from taskmoe.summarizer.switch import adapters_of

__all__ = ["PipelineConfig", "CrosstalkRunner", "Control", "TokenEvent", "System", "draft_generator", "prompt_head"]

GEN_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "draft_tokens")
"""The decoding fields a call (``**gen``) or a single row (``options[i]``) may override."""


@dataclass
class PipelineConfig(Config):
    """How the pipeline drafts, decides and decodes (stored in ``taskmoe.json`` meta ``pipeline``)."""

    draft_tokens: int = doc(48, "new tokens each selected expert drafts (the summarizer was trained on this length)")
    draft_repetition_penalty: float = doc(1.2, "repetition penalty of the greedy expert drafts (as in training)")
    draft_batch_size: int = doc(32, "prompts per expert decode call")
    max_new_tokens: int = doc(64, "answer tokens the summarizer (or the ensemble) writes at most")
    temperature: float = doc(0.0, "answer sampling temperature; 0 = greedy (deterministic, batch == alone)")
    top_k: int = doc(0, "sample among the k most likely tokens (0 = all)")
    top_p: float = doc(1.0, "nucleus mass (1 = off)")
    repetition_penalty: float = doc(1.3, "CTRL repetition penalty of the answer (1 = off)")
    seed: int | None = doc(0, "seed of answer sampling (None = nondeterministic)")
    max_len: int = doc(512, "summarizer input budget in tokens (drafts are cut to fit, never the prompt)")
    adapter: str = doc("code", "LoRA adapter of the summarizer used on the intent below")
    adapter_intent: str = doc("code", "intent label that switches the adapter on")
    crosstalk: bool = doc(True, "run the experts' cross-talk dialogue when the router flags a pair")
    disagreement: DisagreementConfig = dataclasses.field(default_factory=DisagreementConfig,
                                                         metadata={"help": "when to ask for clarification"})

    def validate(self) -> None:
        for f in ("draft_tokens", "draft_batch_size", "max_len"):
            check(getattr(self, f) >= 1, f"PipelineConfig.{f} must be >= 1, got {getattr(self, f)}")
        check(self.max_new_tokens >= 0, f"PipelineConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        check(self.draft_repetition_penalty > 0, "PipelineConfig.draft_repetition_penalty must be > 0")
        if isinstance(self.disagreement, dict):
            self.disagreement = DisagreementConfig.from_dict(self.disagreement, source="PipelineConfig.disagreement")

    def generation(self, eos_id: int) -> GenerationConfig:
        """The answer's GenerationConfig (stops at ``<|eos|>``)."""
        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, repetition_penalty=self.repetition_penalty, stop_tokens=[int(eos_id)],
                                seed=self.seed)


class System(SystemParts):
    """A loaded IMoE system (see the module docstring). Build with :func:`taskmoe.load`.

    ``fmt`` is the summarizer's prompt format (default: :class:`FusionFormat` over the special
    tokens; a backbone system injects :class:`~taskmoe.summarizer.backbone_format.BackboneFusionFormat`).
    """

    def __init__(
        self,
        tokenizer: Any,
        router: Any,
        store: ExpertStore,
        expert_of: Mapping[str, str],
        *,
        summarizer: nn.Module | None = None,
        intent: IntentClassifier | None = None,
        crosstalk: CrosstalkRunner | None = None,
        config: PipelineConfig | None = None,
        source: str | Path | None = None,
        meta: Mapping[str, Any] | None = None,
        fmt: Any = None,
    ) -> None:
        self.tokenizer, self.router, self.store = tokenizer, router, store
        self.expert_of = dict(expert_of)
        pruned = {router.categories[i] for i in getattr(router, "unavailable", ())}  # routed around, need no expert
        missing = [c for c in router.categories if c not in self.expert_of and c not in pruned]
        if missing:
            raise ConfigError(f"router categories {missing} have no expert (expert_of maps {sorted(self.expert_of)})")
        unknown = sorted({e for e in self.expert_of.values() if e not in store})
        if unknown:
            raise ConfigError(f"experts {unknown} are not registered in the expert store (has {store.names})")
        self.summarizer = summarizer.eval() if summarizer is not None else None
        self.intent = intent
        self.crosstalk = crosstalk
        self.config = config or PipelineConfig()
        self.source = Path(source) if source is not None else None
        self.meta = dict(meta or {})  # the manifest's free-form meta (training summary, calibration)
        # the summarizer's prompt format: injected (a backbone's chat-template format), else the special-token one
        self.fmt = fmt if fmt is not None or summarizer is None else FusionFormat(tokenizer, max_len=self.config.max_len)
        self.topics = {self.expert_of[c]: d for c, d in zip(router.categories, getattr(router, "descriptions", []) or [])
                       if d and c in self.expert_of}
        if intent is not None and summarizer is not None and intent.feature != "summarizer_hidden":
            raise ConfigError(f"intent head was fitted on '{intent.feature}' features; the pipeline feeds it "
                              "the summarizer's pooled hidden states ('summarizer_hidden')")

    @property
    def mode(self) -> str:
        return "summarizer" if self.summarizer is not None else "ensemble"

    @property
    def adapters(self) -> list[str]:
        return adapters_of(self.summarizer) if self.summarizer is not None else []

    def stages(self) -> list[Stage]:
        """The stages a call runs, in order (built from the current parts: cheap, holds no state)."""
        tok, route = self.tokenizer, Route(self.router)
        if self.summarizer is None or self.fmt is None:
            return [route, Ensemble(self.expert_of, tok)]
        return [route, Draft(self.expert_of, tok), Crosstalk(self.crosstalk, self.expert_of, tok),
                Assess(self.summarizer, self.fmt, self.intent, self.router.encode, tok, self.topics),
                Fuse(self.summarizer, self.fmt, tok.eos_id, self.adapters)]

    def describe(self) -> dict[str, Any]:
        """A short summary of what is loaded (for the CLI and reports)."""
        return {
            "source": str(self.source) if self.source else None, "mode": self.mode,
            "categories": list(self.router.categories),
            "experts": {c: self.expert_of.get(c, "(pruned)") for c in self.router.categories},
            "resident_experts": self.store.stats().resident, "adapters": self.adapters,
            "intent_labels": list(self.intent.labels) if self.intent is not None else [],
            "crosstalk": None if self.crosstalk is None else ("trained" if getattr(self.crosstalk, "trained", True)
                                                               else "untrained (base weights)"),
            "policy": self.router.policy.to_dict(), "pipeline": self.config.to_dict(),
        }

    # ------------------------------------------------------------------------- text level
    def encode(self, text: str) -> list[int]:
        """Prompt text -> token ids (special-token strings in the text are plain text)."""
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, allow_special=False))

    def route(self, prompt: str) -> RoutingDecision:
        return self.router.route_batch([self.encode(prompt)])[0]

    def generate(self, prompt: str, trace: bool = True, **gen: Any) -> Answer:
        """Answer one prompt; ``gen`` overrides :class:`PipelineConfig` decoding fields for this call."""
        return self.generate_batch([prompt], trace=trace, **gen)[0]

    def generate_batch(self, prompts: Sequence[str], trace: bool = True, *, controls: Sequence[Control] | None = None,
                       on_token: OnToken | None = None, options: Sequence[Mapping[str, Any] | None] | None = None,
                       **gen: Any) -> list[Answer]:
        """Answer many prompts together (each stage runs once for the batch); see :meth:`generate_ids`."""
        if isinstance(prompts, str):
            raise RequestError("generate_batch takes a list of prompts; use generate() for one")
        clock = Clock()
        with clock("tokenize"):
            ids = [self.encode(p) for p in prompts]
        out = []
        for p, (text_ids, tr) in zip(prompts, self.generate_ids(ids, controls=controls, on_token=on_token,
                                                                options=options, clock=clock, **gen)):
            tr.prompt = p
            text = tr.clarification if tr.clarify else self.tokenizer.decode(text_ids, skip_special=True)
            out.append(Answer(text or "", tr if trace else None, list(text_ids)))
        return out

    def stream(self, prompts: str | Sequence[str], trace: bool = True, *, controls: Sequence[Control] | None = None,
               options: Sequence[Mapping[str, Any] | None] | None = None, **gen: Any) -> PipelineStream:
        """Iterate :class:`TokenEvent` s as they are produced; ``.answers`` afterwards (closing early cancels)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        ctl = list(controls) if controls is not None else [Control() for _ in batch]
        return PipelineStream(lambda on_token: self.generate_batch(batch, trace, controls=ctl, on_token=on_token,
                                                                   options=options, **gen), ctl)

    # ---------------------------------------------------------------------- token-id level
    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]], *, controls: Sequence[Control] | None = None,
                     on_token: OnToken | None = None, options: Sequence[Mapping[str, Any] | None] | None = None,
                     clock: Clock | None = None, **gen: Any) -> list[tuple[list[int], Trace]]:
        """The engine level: prompt ids (no BOS) -> (answer ids, trace) per prompt.

        ``controls[i]`` stops row ``i``'s work (cancel / deadline); ``on_token(row, token, stage,
        expert)`` streams every token; ``options[i]`` overrides decoding fields (:data:`GEN_FIELDS`)
        for row ``i`` on top of ``gen``. When the drafts disagree the answer ids are empty and
        ``trace.clarification`` holds the question (written, not decoded; streamed as stage
        ``"clarification"``). A stopped row returns what it produced (``trace.stopped``).
        """
        rows, call = self.call_rows(prompts, controls=controls, on_token=on_token, options=options, clock=clock, **gen)
        for stage in self.stages():
            rows = stage(rows, call)
        return self.results(rows, call)

    def call_rows(self, prompts: Sequence[Sequence[int]], *, controls: Sequence[Control] | None = None,
                  on_token: OnToken | None = None, options: Sequence[Mapping[str, Any] | None] | None = None,
                  clock: Clock | None = None, **gen: Any) -> tuple[list[Row], Call]:
        """One call's stage rows and :class:`Call` (arguments as :meth:`generate_ids`)."""
        prompts = [[int(t) for t in p] for p in prompts]
        for name, per_row in (("controls", controls), ("options", options)):
            if per_row is not None and len(per_row) != len(prompts):
                raise RequestError(f"{name} must give one entry per prompt: {len(prompts)} prompts, {len(per_row)} {name}")
        base = self._config(gen)
        call = Call(base, RecordingStore(self.store), clock or Clock(), on_token, size=len(prompts))
        rows = [Row(i, p, self._config({**gen, **(options[i] or {})}) if options is not None and options[i] else base,
                    Trace(prompt="", prompt_tokens=len(p), mode=self.mode, routing={}),
                    controls[i] if controls is not None else Control()) for i, p in enumerate(prompts)]
        return rows, call

    def results(self, rows: Sequence[Row], call: Call) -> list[tuple[list[int], Trace]]:
        """Finished rows of ``call`` -> (answer ids, trace): the experts used, timings, the call's size."""
        for r in rows:
            d, tr = r.decision, r.trace
            tr.experts = [] if d is None else [
                ExpertUse(self.expert_of[c], c, float(d.confidences[i]), *call.store.uses.get(self.expert_of[c], ("unused", 0.0)))
                for i, c in zip(d.selected, d.selected_names)]
            tr.timings, tr.answer_tokens = dict(call.clock.t), len(r.answer)
            tr.batch_size = call.size or len(rows)
        return [(r.answer, r.trace) for r in rows]

    def open_session(self) -> PipelineSession:
        """The stages opened for continuous batching: calls' rows join between decode steps.

        ``session.add(*system.call_rows(prompts, ...))``, then ``session.step()`` until it is empty;
        each step returns the ``(row, call)`` pairs that are done (:meth:`results` gives their
        answers, equal to :meth:`generate_ids`'). See :mod:`taskmoe.inference.stages.session`.
        """
        return PipelineSession(self.stages())

    def _config(self, gen: Mapping[str, Any]) -> PipelineConfig:
        bad = sorted(set(gen) - set(GEN_FIELDS))
        if bad:
            raise RequestError(f"unknown generation option(s) {bad}; known: {list(GEN_FIELDS)}")
        return self.config.replace(**gen) if gen else self.config
