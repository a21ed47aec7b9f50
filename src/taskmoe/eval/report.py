"""The run report: ``<run>/report.md`` with plots under ``<run>/reports/``, from a trained system.

Sections (each computed on the corpus's *test* split, which no stage trained or calibrated on):

- **Routing**: NMI / purity of the discovered categories against the (evaluation-only) domain
  labels, the category x domain table, and the PCA routing map
  (:mod:`taskmoe.eval.routing`) -> ``reports/routing_map.png``.
- **Perplexity**: every expert on every domain and the routed mixture (routing on each
  document's first tokens only; :mod:`taskmoe.eval.perplexity`) -> ``expert_perplexity.png``;
  then the summarizer's question, does fusion help: target perplexity under the summarizer with
  the drafts vs the best single selected expert (:func:`taskmoe.eval.fusion.fusion_perplexity`),
  the coding adapter and the intent head (:func:`taskmoe.eval.fusion.adapter_eval`).
- **Loss curves** of every training run (router encoder, each expert, summarizer, coding
  adapter), read from their ``metrics.jsonl`` -> ``loss_curves.png``.
- **Expert usage**: how often each expert is selected on test prompts, split by true domain,
  with the fallback and cross-talk rates -> ``expert_usage.png``.
- **Samples**: a few prompts per domain through the whole pipeline (routing line, adapter,
  clarification, answer).
- **Stages**: what each stage did and how long it took; every number also goes to
  ``reports/metrics.json``.

Plots use matplotlib's Agg backend (no display needed); files are written atomically.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from taskmoe.progress import progress_bar
from taskmoe.eval.fusion import adapter_eval, fusion_perplexity, heldout_pairs
from taskmoe.eval.perplexity import ALL, build_windows, perplexity_matrix, plot_matrix, route_prefixes, routed_perplexity
from taskmoe.eval.routing import evaluate_routing, plot_map
from taskmoe.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["REPORT_FILE", "REPORTS_DIR", "loss_curves", "plot_loss_curves", "plot_expert_usage", "md_table", "write_report"]

REPORT_FILE = "report.md"
REPORTS_DIR = "reports"


def md_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str] | None = None) -> str:
    """A markdown table (floats to 4 significant digits; ``|`` and newlines escaped)."""
    if not rows:
        return "_(none)_"
    cols = list(cols or rows[0])

    def cell(v: Any) -> str:
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    out += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- loss curves
def loss_curves(files: Mapping[str, Path]) -> dict[str, dict[str, list[float]]]:
    """``{run name: {"step": [...], "loss": [...], "eval_step": [...], "eval_loss": [...]}}`` from metrics.jsonl files."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, path in files.items():
        if not Path(path).is_file():
            continue
        c: dict[str, list[float]] = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == "train" and "loss" in r:
                c["step"].append(float(r["step"]))
                c["loss"].append(float(r["loss"]))
            elif r.get("kind") == "eval" and "eval_loss" in r:
                c["eval_step"].append(float(r["step"]))
                c["eval_loss"].append(float(r["eval_loss"]))
        if c["step"]:
            out[name] = c
    return out


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_loss_curves(curves: Mapping[str, Mapping[str, list[float]]], path: Path) -> Path:
    """One panel per group (router / experts / summarizer / adapter); train lines solid, eval dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[str]] = {}
    for name in curves:
        groups.setdefault(name.split("/")[0], []).append(name)
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (g, names) in zip(axes[0], groups.items()):
        for i, name in enumerate(names):
            c = curves[name]
            color = plt.get_cmap("tab10")(i % 10)
            label = name.split("/", 1)[1] if "/" in name else name
            ax.plot(c["step"], c["loss"], color=color, lw=1.2, label=f"{label} train")
            if c["eval_step"]:
                ax.plot(c["eval_step"], c["eval_loss"], color=color, ls="--", marker="o", ms=3, label=f"{label} eval")
        ax.set_title(g)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_expert_usage(decisions: Sequence[Any], domains: Sequence[str | None], expert_of: Mapping[str, str],
                      path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Bar chart: how often each expert is selected, stacked by the prompt's true domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted(set(expert_of.values()))
    doms = sorted({str(d) for d in domains})
    counts = {e: Counter() for e in experts}
    for d, dom in zip(decisions, domains):
        for c in d.selected_names:
            counts[expert_of[c]][str(dom)] += 1
    rows = [{"expert": e, **{dm: counts[e][dm] for dm in doms}, "total": sum(counts[e].values())} for e in experts]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(experts), 3.6))
    bottom = np.zeros(len(experts))
    for j, dm in enumerate(doms):
        v = np.array([counts[e][dm] for e in experts], dtype=float)
        ax.bar(experts, v, bottom=bottom, color=plt.get_cmap("tab10")(j % 10), label=dm)
        bottom += v
    fb = float(np.mean([d.fallback for d in decisions])) if decisions else 0.0
    ax.set_title(f"expert selections on {len(decisions)} test prompts (fallback {fb:.0%})")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8, title="true domain")
    fig.tight_layout()
    return _save(fig, path), rows


# ------------------------------------------------------------------------------- report
def _fmt_stage(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"stage": row.get("stage"), "status": row.get("status"), "seconds": round(float(row.get("seconds", 0.0)), 1),
            "cpu seconds": round(float(row.get("cpu_seconds", 0.0)), 1), "detail": row.get("detail", "")}


def write_report(
    run_dir: Path,
    system: Any,
    corpus: Any,
    *,
    samples: Sequence[Mapping[str, Any]] = (),
    stages: Sequence[Mapping[str, Any]] = (),
    settings: Mapping[str, Any] | None = None,
    docs_per_domain: int = 40,
    seq_len: int = 256,
    route_tokens: int = 32,
    prompt_tokens: int = 64,
    target_tokens: int = 48,
    progress: bool = True,
) -> Path:
    """Evaluate ``system`` on the test split of ``corpus`` and write ``run_dir/report.md`` (module docstring)."""
    run_dir = Path(run_dir)
    out = run_dir / REPORTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok, router = system.tokenizer, system.router
    test = list(corpus.test or corpus.validation)
    per: Counter = Counter()
    docs = []
    for d in test:
        if per[d.domain] < docs_per_domain:
            per[d.domain] += 1
            docs.append(d)
    ids = tok.encode_batch([d.text for d in docs], allow_special=False)
    doms = [d.domain for d in docs]
    metrics: dict[str, Any] = {"settings": dict(settings or {}), "test_documents": len(docs)}
    with progress_bar(progress) as bar:
        task = bar.add_task("report", total=6)
        ev = evaluate_routing(router, ids, doms)
        plot_map(ev, router.categories, out / "routing_map.png")
        metrics["routing"] = {**ev.summary(), "table": ev.table}
        bar.advance(task)

        windows = build_windows(ids, doms, seq_len=seq_len, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                route_tokens=route_tokens, max_doc_tokens=seq_len * 2)
        experts = {c: system.store.get(system.expert_of[c]) for c in router.categories}
        matrix = perplexity_matrix({f"expert {c}": m for c, m in experts.items()}, windows)
        decisions = route_prefixes(router, windows)
        routed = {"model": "routed mixture", **routed_perplexity(decisions, router.categories, experts, windows)}
        cols = windows.domain_names() + [ALL]
        plot_matrix(matrix + [routed], cols, out / "expert_perplexity.png",
                    title=f"held-out perplexity (test, {windows.tokens} tokens)")
        metrics["perplexity"] = {"columns": cols, "rows": matrix + [routed], "tokens": windows.tokens}
        bar.advance(task)

        usage_png, usage = plot_expert_usage(decisions, windows.domains, system.expert_of, out / "expert_usage.png")
        metrics["expert_usage"] = usage
        bar.advance(task)

        fusion: list[dict[str, Any]] = []
        adapter: dict[str, Any] = {}
        if system.summarizer is not None:
            pairs = heldout_pairs(docs, tok, prompt_tokens=prompt_tokens, target_tokens=target_tokens)
            fusion = fusion_perplexity(system, pairs)
            adapter = adapter_eval(system, pairs)
        metrics["fusion"] = fusion
        metrics["adapter"] = adapter
        bar.advance(task)

        files = {"router/encoder": run_dir / "train" / "router" / "metrics.jsonl"}
        for c in router.categories:
            files[f"experts/{system.expert_of[c]}"] = run_dir / "train" / "experts" / system.expert_of[c] / "metrics.jsonl"
        files["summarizer/fusion"] = run_dir / "train_summarizer" / "metrics.jsonl"
        files["summarizer/code adapter"] = run_dir / "train_code_adapter" / "metrics.jsonl"
        curves = loss_curves(files)
        if curves:
            plot_loss_curves(curves, out / "loss_curves.png")
        metrics["final_losses"] = {k: c["loss"][-1] for k, c in curves.items()}
        bar.advance(task)

        metrics["samples"] = list(samples)
        metrics["stages"] = [dict(s) for s in stages]
        metrics["report_seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(out / "metrics.json", metrics)
        path = atomic_write_text(run_dir / REPORT_FILE, _markdown(run_dir, system, metrics, bool(curves)))
        bar.advance(task)
    return path


def _markdown(run_dir: Path, system: Any, m: Mapping[str, Any], have_curves: bool) -> str:
    r = m["routing"]
    cats = system.router.categories
    desc = dict(zip(cats, getattr(system.router, "descriptions", [""] * len(cats))))
    lines = [
        f"# taskmoe run report: `{run_dir.name}`",
        "",
        f"Trained system in `{run_dir}` ({system.mode} mode). Load it with `taskmoe.load(\"{run_dir}\")` or ask it "
        f"from the shell: `taskmoe generate {run_dir} \"your prompt\" --trace`.",
        "",
        f"Every number below is measured on the corpus's **test split** ({m['test_documents']} documents), which no "
        "stage trained or calibrated on. Domain labels are used for evaluation only.",
        "",
        "## Routing",
        "",
        f"The router discovered {len(cats)} categories without labels. Against the true domains: NMI "
        f"**{r['nmi']:.3f}**, purity **{r['purity']:.3f}**, calibration error {r['ece']:.3f}; "
        f"{r['mean_selected']:.2f} experts selected per document on average, fallback {r['fallback_rate']:.1%}, "
        f"cross-talk {r['crosstalk_rate']:.1%}.",
        "",
        md_table([{"category": c, "characteristic tokens": desc.get(c, ""), "expert": system.expert_of[c]} for c in cats]),
        "",
        md_table(r["table"]),
        "",
        "![routing map](reports/routing_map.png)",
        "",
        "## Perplexity",
        "",
        f"Held-out perplexity of each expert on each domain, and of the routed mixture (routing sees only each "
        f"document's first tokens, which are not scored; {m['perplexity']['tokens']} scored tokens).",
        "",
        md_table(m["perplexity"]["rows"], ["model", *m["perplexity"]["columns"]]),
        "",
        "![expert perplexity](reports/expert_perplexity.png)",
        "",
    ]
    if m["fusion"]:
        lines += [
            "### Does fusion help?",
            "",
            "Perplexity of the true continuation (or reply) of held-out prompts: the summarizer reading the prompt and "
            "the selected experts' drafts (coding adapter on coding intent, as deployed), the summarizer with no "
            "drafts, the most confident selected expert, and the best selected expert per example (an oracle).",
            "",
            md_table(m["fusion"], ["domain", "examples", "tokens", "summarizer", "summarizer_no_drafts", "top1_expert",
                                   "best_selected_expert"]),
            "",
        ]
        a = m["adapter"]
        if a:
            parts = []
            if "code_ppl_with_adapter" in a:
                parts.append(f"code-domain perplexity {a['code_ppl_without_adapter']:.2f} without the coding adapter, "
                             f"{a['code_ppl_with_adapter']:.2f} with it ({a['code_examples']} examples)")
            if "intent_accuracy" in a:
                parts.append(f"intent head accuracy (code vs other) {a['intent_accuracy']:.1%}")
            lines += ["Coding adapter and intent: " + "; ".join(parts) + ".", ""]
    cal = system.config.disagreement
    meta = system.meta.get("disagreement_calibration") or {}
    lines += [f"Disagreement threshold: {cal.threshold:.3f}"
              + (f" (precision {meta['precision']:.2f}, recall {meta['recall']:.2f} on planted conflicts vs natural "
                 f"agreements of validation prompts)" if "precision" in meta else "")
              + (f" (not calibrated: {meta['skipped']})" if "skipped" in meta else "") + ".", ""]
    if have_curves:
        lines += ["## Loss curves", "", md_table([{"run": k, "final train loss": v} for k, v in m["final_losses"].items()]),
                  "", "![loss curves](reports/loss_curves.png)", ""]
    lines += ["## Expert usage", "", md_table(m["expert_usage"]), "", "![expert usage](reports/expert_usage.png)", ""]
    if m["samples"]:
        lines += ["## Sample answers", ""]
        for s in m["samples"]:
            lines += [f"**{s.get('domain', '-')}** — prompt: `{_short(s['prompt'], 160)}`", "",
                      f"- {s['routing']}",
                      f"- adapter: {s.get('adapter') or 'none'}; disagreement: {s.get('disagreement', '-')}"
                      + ("; **asked for clarification**" if s.get("clarify") else ""),
                      f"- answer: `{_short(s['answer'], 300)}`", ""]
    if m["stages"]:
        lines += ["## Stages", "", md_table([_fmt_stage(s) for s in m["stages"]]), ""]
    lines += ["All numbers: `reports/metrics.json`.", ""]
    return "\n".join(lines)


def _short(text: str, n: int) -> str:
    t = " ".join(str(text).split()).replace("`", "'")
    return t if len(t) <= n else t[: n - 3] + "..."
