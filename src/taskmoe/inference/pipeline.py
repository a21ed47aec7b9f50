"""The IMoE pipeline, text in: route -> expert drafts -> cross-talk -> disagreement -> summarize.

:class:`System` holds the trained parts (built elsewhere and injected: tokenizer, router, expert
store, summarizer with its adapters, intent head, cross-talk runner) and answers prompts:

1. **route** every prompt once (:meth:`Router.route_batch`): confidences, c_S, t_C, selected
   experts, fallback, cross-talk pair;
2. **draft**: prompts are grouped by selected expert and each expert runs *once* over its rows
   (:class:`~taskmoe.summarizer.drafts.Drafter`, greedy, the same draft function the summarizer
   was trained on, :func:`draft_generator`); the store loads an expert lazily on first use and
   the trace says whether it was loaded now or already cached;
3. **cross-talk** (optional): when the router flags a pair and a runner is configured, the
   runner turns the pair's drafts into a dialogue transcript (contract: :class:`CrosstalkRunner`);
4. **disagreement**: draft similarity (router encoder) and intent consistency
   (:func:`~taskmoe.summarizer.disagreement.assess`); above the threshold the drafts are ignored
   and the answer is a clarification question naming the conflicting experts;
5. **summarize**: intent is detected from the summarizer's pooled prompt states; every other
   row is answered in ONE batched decode of the summarizer, with the coding LoRA adapter on
   exactly the rows with coding intent (:class:`~taskmoe.inference.rowwise.AdapterRowsLM`).

Without a summarizer (experts-only mode) step 2-5 are replaced by confidence-weighted ensemble
decoding of the selected experts (:class:`~taskmoe.inference.rowwise.EnsembleLM`), grouped by
expert set.

Exactness: every step is row-independent (greedy decoding of a row does not depend on the other
rows of its batch), so :meth:`System.generate_batch` gives each prompt exactly the answer
:meth:`System.generate` gives it alone (tested with greedy decoding; with sampling the rows
share one seeded generator and differ from solo runs).

Glossary: c_S complexity, t_C selection threshold, t_CT cross-talk threshold (router);
D disagreement score (summarizer.disagreement).
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from taskmoe.config import Config, check, doc
from taskmoe.errors import ConfigError, RequestError
from taskmoe.experts.store import ExpertStore
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.inference.rowwise import AdapterRowsLM, EnsembleLM
from taskmoe.inference.trace import Answer, DraftRecord, ExpertUse, Trace
from taskmoe.layers.lora import adapter_names
from taskmoe.router.policy import RoutingDecision
from taskmoe.summarizer.disagreement import DisagreementConfig, DisagreementReport, assess, clarification
from taskmoe.summarizer.drafts import Drafter, GenerateFn
from taskmoe.summarizer.fuser import Draft, FusionFormat, order_drafts
from taskmoe.summarizer.intent import IntentClassifier, IntentResult, pooled_hidden

__all__ = ["PipelineConfig", "CrosstalkRunner", "System", "draft_generator", "prompt_head"]

GEN_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "draft_tokens")


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


def draft_generator(eos_id: int, repetition_penalty: float = 1.2) -> GenerateFn:
    """THE draft function (training and inference use the same): greedy, penalised, stops at eos."""

    def run(model: nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=repetition_penalty,
                               stop_tokens=[int(eos_id)])
        return generate(model, prompts, cfg)

    return run


def prompt_head(fmt: FusionFormat, ids: Sequence[int]) -> list[int]:
    """``<|bos|><|user|> ids``: what the intent head reads (as in :mod:`taskmoe.training.recipes.summarizer`)."""
    return [fmt.sp["<|bos|>"], fmt.sp["<|user|>"], *map(int, ids)]


class CrosstalkRunner(Protocol):
    """The cross-talk hook: ``runner(prompt_ids, speakers, drafts) -> (drafts, turns)``.

    ``prompt_ids``: the prompt's token ids (no BOS); ``speakers``: ``[(expert, confidence,
    model), ...]`` for the flagged pair, most confident first; ``drafts``: their independent
    drafts. Returns the drafts that replace the pair's in the summarizer's input (the transcript,
    with speakers) and the turns as JSON-safe dicts for the trace (e.g. ``{"expert", "text",
    "interrupted", "p_interrupt"}``). Only plain types cross this boundary, so the cross-talk
    package (below inference) can implement it without importing the pipeline.
    """

    def __call__(self, prompt_ids: list[int], speakers: list[tuple[str, float, nn.Module]],
                 drafts: list[Draft]) -> tuple[list[Draft], list[dict[str, Any]]]: ...


# ----------------------------------------------------------------------------- helpers
class _Decided:
    """A router stand-in that returns decisions already made (so routing is timed on its own)."""

    def __init__(self, decisions: list[RoutingDecision]) -> None:
        self.decisions = decisions

    def route_batch(self, seqs: Sequence[Sequence[int]]) -> list[RoutingDecision]:
        if len(seqs) != len(self.decisions):
            raise ConfigError(f"{len(seqs)} prompts for {len(self.decisions)} routing decisions")
        return self.decisions


class _RecordingStore:
    """The expert store as seen by one call: records whether each expert was loaded now or cached."""

    def __init__(self, store: ExpertStore) -> None:
        self.store = store
        self.uses: dict[str, tuple[str, float]] = {}

    @property
    def names(self) -> list[str]:
        return self.store.names

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def get(self, name: str) -> nn.Module:
        resident = self.store.is_resident(name)
        t0 = time.perf_counter()
        model = self.store.get(name)
        if name not in self.uses:
            self.uses[name] = ("cached", 0.0) if resident else ("loaded", time.perf_counter() - t0)
        return model


class _Clock:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[stage] = self.t.get(stage, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------ system
class System:
    """A loaded IMoE system (see the module docstring). Build with :func:`taskmoe.load`."""

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
        self.fmt = FusionFormat(tokenizer, max_len=self.config.max_len) if summarizer is not None else None
        self.topics = {self.expert_of[c]: d for c, d in zip(router.categories, getattr(router, "descriptions", []) or [])
                       if d and c in self.expert_of}
        if intent is not None and summarizer is not None and intent.feature != "summarizer_hidden":
            raise ConfigError(f"intent head was fitted on '{intent.feature}' features; the pipeline feeds it "
                              "the summarizer's pooled hidden states ('summarizer_hidden')")

    # ---------------------------------------------------------------------- properties
    @property
    def mode(self) -> str:
        return "summarizer" if self.summarizer is not None else "ensemble"

    @property
    def adapters(self) -> list[str]:
        return adapter_names(self.summarizer) if self.summarizer is not None else []

    def describe(self) -> dict[str, Any]:
        """A short summary of what is loaded (for the CLI and reports)."""
        return {
            "source": str(self.source) if self.source else None,
            "mode": self.mode,
            "categories": list(self.router.categories),
            "experts": {c: self.expert_of.get(c, "(pruned)") for c in self.router.categories},
            "resident_experts": self.store.stats().resident,
            "adapters": self.adapters,
            "intent_labels": list(self.intent.labels) if self.intent is not None else [],
            "policy": self.router.policy.to_dict(),
            "pipeline": self.config.to_dict(),
        }

    # ------------------------------------------------------------------------- the API
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

    def generate_batch(self, prompts: Sequence[str], trace: bool = True, **gen: Any) -> list[Answer]:
        """Answer many prompts together: one routing pass, one draft pass per expert over its rows,
        one summarizer decode over all rows (adapter by row)."""
        if isinstance(prompts, str):
            raise RequestError("generate_batch takes a list of prompts; use generate() for one")
        clock = _Clock()
        with clock("tokenize"):
            ids = [self.encode(p) for p in prompts]
        answers = self.generate_ids(ids, clock=clock, **gen)
        out = []
        for p, (text_ids, tr) in zip(prompts, answers):
            tr.prompt = p
            text = tr.clarification if tr.clarify else self.tokenizer.decode(text_ids, skip_special=True)
            out.append(Answer(text, tr if trace else None, list(text_ids)))
        return out

    def _config(self, gen: Mapping[str, Any]) -> PipelineConfig:
        bad = sorted(set(gen) - set(GEN_FIELDS))
        if bad:
            raise RequestError(f"unknown generation option(s) {bad}; known: {list(GEN_FIELDS)}")
        return self.config.replace(**gen) if gen else self.config

    # ------------------------------------------------------------------ token-id level
    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]], *, clock: _Clock | None = None,
                     **gen: Any) -> list[tuple[list[int], Trace]]:
        """The engine level: prompt ids (no BOS) -> (answer ids, trace) per prompt.

        When the drafts disagree, the answer ids are empty and ``trace.clarification`` holds the
        clarification question (it is written, not decoded).
        """
        cfg = self._config(gen)
        clock = clock or _Clock()
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts:
            return []
        with clock("route"):
            decisions = self.router.route_batch(prompts)
        traces = [Trace(prompt="", prompt_tokens=len(p), mode=self.mode, routing={**d.to_dict(),
                        "selected_names": d.selected_names}) for p, d in zip(prompts, decisions)]
        recorder = _RecordingStore(self.store)
        if self.summarizer is None:
            answers = self._ensemble(prompts, decisions, recorder, cfg, clock)
        else:
            answers = self._summarize(prompts, decisions, traces, recorder, cfg, clock)
        for d, tr in zip(decisions, traces):
            tr.experts = [ExpertUse(self.expert_of[c], c, float(d.confidences[i]), *recorder.uses.get(self.expert_of[c], ("unused", 0.0)))
                          for i, c in zip(d.selected, d.selected_names)]
            tr.timings = dict(clock.t)
            tr.batch_size = len(prompts)
        for a, tr in zip(answers, traces):
            tr.answer_tokens = len(a)
        return list(zip(answers, traces))

    # -------------------------------------------------------------- experts-only mode
    def lm_input(self, ids: Sequence[int]) -> list[int]:
        """What the ensemble decodes from: ``<|bos|> prompt``, or, with a backbone's tokenizer, the
        prompt as a user turn of its chat template (an instruct backbone answers the turn)."""
        tok = self.tokenizer
        if hasattr(tok, "encode_chat"):
            return list(tok.encode_chat([{"role": "user", "content": tok.decode(list(ids))}]))
        return [tok.bos_id, *ids]

    def _ensemble(self, prompts: list[list[int]], decisions: list[RoutingDecision], store: _RecordingStore,
                  cfg: PipelineConfig, clock: _Clock) -> list[list[int]]:
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, d in enumerate(decisions):
            groups[tuple(self.expert_of[c] for c in d.selected_names)].append(i)
        out: list[list[int]] = [[] for _ in prompts]
        with clock("ensemble"):
            for names in sorted(groups):
                rows = groups[names]
                models = [store.get(n) for n in names]
                inputs = [self.lm_input(prompts[i]) for i in rows]
                w = torch.tensor([decisions[i].weights for i in rows], dtype=torch.float32)  # (rows, E)
                for i, o in zip(rows, generate(EnsembleLM(models), inputs, cfg.generation(self.tokenizer.eos_id), side=list(w))):
                    out[i] = o
        return out

    # ---------------------------------------------------------------- summarizer mode
    def draft(self, prompts: Sequence[Sequence[int]], decisions: Sequence[RoutingDecision] | None = None, *,
              cfg: PipelineConfig | None = None, store: Any = None) -> list[list[Draft]]:
        """Each prompt's drafts by its selected experts (most confident first); one pass per expert.

        ``decisions`` (default: route now) may select any experts, e.g. a forced pair for an
        evaluation. ``store`` is the expert store as seen by this call (default: the system's).
        """
        cfg = cfg or self.config
        tok = self.tokenizer
        prompts = [[int(t) for t in p] for p in prompts]
        decisions = list(decisions) if decisions is not None else self.router.route_batch(prompts)
        drafter = Drafter(_Decided(decisions), store if store is not None else self.store,
                          draft_generator(tok.eos_id, cfg.draft_repetition_penalty), bos_id=tok.bos_id,
                          max_new_tokens=cfg.draft_tokens, batch_size=cfg.draft_batch_size, expert_of=self.expert_of)
        return [order_drafts(s.drafts) for s in drafter.draft(prompts, progress=False)]

    def detect_intent(self, prompts: Sequence[Sequence[int]]) -> list[IntentResult | None]:
        """Intent of each prompt from the summarizer's pooled ``<|bos|><|user|> prompt`` states (None without a head)."""
        if self.intent is None or self.fmt is None:
            return [None] * len(prompts)
        return self.intent.predict(self.features([prompt_head(self.fmt, p) for p in prompts]))

    def features(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """The intent head's input: mean-pooled summarizer hidden states (adapter off), (N, D)."""
        if self.summarizer is None:
            raise ConfigError("features: this system has no summarizer (experts-only mode)")
        from taskmoe.layers.lora import use_adapter

        with use_adapter(self.summarizer, None):  # intent decides whether the adapter runs: read without it
            return pooled_hidden(self.summarizer, seqs, pad_id=self.tokenizer.pad_id)

    def assess(self, prompt: Sequence[int], drafts: Sequence[Draft], cfg: DisagreementConfig | None = None) -> DisagreementReport:
        """Disagreement of ``drafts`` (router-encoder similarity + intent consistency with the prompt)."""
        cfg = cfg or self.config.disagreement
        intent_probs = None
        if self.intent is not None and self.fmt is not None:
            clf, fmt = self.intent, self.fmt

            def intent_probs(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
                return clf(self.features([prompt_head(fmt, s) for s in seqs]))

        return assess([x.expert for x in drafts], [x.confidence for x in drafts], [list(x.ids) for x in drafts],
                      self.router.encode, cfg, intent_probs=intent_probs,
                      intent_labels=self.intent.labels if self.intent is not None else None, prompt_ids=list(prompt))

    def _summarize(self, prompts: list[list[int]], decisions: list[RoutingDecision], traces: list[Trace],
                   store: _RecordingStore, cfg: PipelineConfig, clock: _Clock) -> list[list[int]]:
        assert self.summarizer is not None and self.fmt is not None
        tok, fmt = self.tokenizer, self.fmt
        with clock("drafts"):
            drafts = self.draft(prompts, decisions, cfg=cfg, store=store)
        with clock("crosstalk"):
            for i, d in enumerate(decisions):
                if d.crosstalk is not None:
                    drafts[i], traces[i].crosstalk = self._crosstalk(prompts[i], d, drafts[i], store)
        with clock("intent"):
            intents = self.detect_intent(prompts)
        reports: list[DisagreementReport | None] = [None] * len(prompts)
        with clock("disagreement"):
            for i, p in enumerate(prompts):
                if drafts[i]:
                    reports[i] = self.assess(p, drafts[i], cfg.disagreement)
        answers: list[list[int]] = [[] for _ in prompts]
        rows, fused, use = [], [], []
        for i, tr in enumerate(traces):
            tr.drafts = [DraftRecord(x.expert, x.confidence, tok.decode(list(x.ids), skip_special=True), len(x.ids))
                         for x in drafts[i]]
            if intents[i] is not None:
                tr.intent = intents[i].to_dict()
            rep = reports[i]
            if rep is not None:
                tr.disagreement = rep.to_dict()
                if rep.clarify and rep.conflict is not None:
                    tr.clarify = True
                    tr.clarification = clarification(
                        rep, {x.expert: tr_d.text for x, tr_d in zip(drafts[i], tr.drafts)},
                        {x.expert: x.confidence for x in drafts[i]}, topics=self.topics,
                        n_keywords=cfg.disagreement.n_keywords)
                    continue
            seq = fmt.build(prompts[i], drafts[i], max_len=cfg.max_len)
            tr.fusion.update({"experts": seq.experts, "input_tokens": len(seq.ids),
                              "truncated": {k: list(v) for k, v in seq.truncated.items()}, "dropped": seq.dropped})
            flag = self.uses_adapter(intents[i], cfg)
            tr.adapter = cfg.adapter if flag else None
            rows.append(i)
            fused.append(seq.ids)
            use.append(flag)
        if rows:
            with clock("summarize"):
                model = AdapterRowsLM(self.summarizer, cfg.adapter if any(use) else None)
                for i, o in zip(rows, generate(model, fused, cfg.generation(tok.eos_id), side=use)):
                    answers[i] = o
        return answers

    def uses_adapter(self, intent: IntentResult | None, cfg: PipelineConfig | None = None) -> bool:
        """True when ``intent`` switches the summarizer's adapter on (and that adapter is loaded)."""
        cfg = cfg or self.config
        return intent is not None and intent.label == cfg.adapter_intent and cfg.adapter in self.adapters

    def _crosstalk(self, prompt: list[int], d: RoutingDecision, drafts: list[Draft],
                   store: _RecordingStore) -> tuple[list[Draft], dict[str, Any]]:
        a, b = d.crosstalk  # type: ignore[misc]
        pair = [self.expert_of[d.categories[a]], self.expert_of[d.categories[b]]]
        info: dict[str, Any] = {"pair": pair, "categories": [d.categories[a], d.categories[b]], "ran": False, "turns": []}
        if self.crosstalk is None:
            info["reason"] = "no cross-talk runner configured"
            return drafts, info
        conf = {x.expert: x.confidence for x in drafts}
        speakers = [(n, conf.get(n, float(d.confidences[c])), store.get(n)) for n, c in zip(pair, (a, b))]
        pair_drafts = [x for x in drafts if x.expert in pair]
        new, turns = self.crosstalk(list(prompt), speakers, pair_drafts)
        info.update(ran=True, turns=list(turns))
        return order_drafts([x for x in drafts if x.expert not in pair] + list(new)), info
