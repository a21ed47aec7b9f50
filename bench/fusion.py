"""Benchmark: does the IMoE summarizer help, does disagreement detection work, does the coding adapter help?

On the quickstart system (built by ``taskmoe quickstart`` if the run folder does not exist yet;
reused otherwise), all on the corpus's **test** split, against baselines measured in the same run:

1. **Fusion vs single experts**: perplexity of the true continuation / reply of held-out prompts
   under the summarizer reading the prompt and the selected experts' drafts (coding adapter on
   coding intent, as deployed) vs the same summarizer with no drafts, the top-1 selected expert,
   and the best selected expert per example (oracle), per domain
   (:func:`taskmoe.eval.fusion.fusion_perplexity`).
2. **Disagreement**: precision and recall of ``D > threshold`` on planted conflicts (a prompt's top
   draft paired with the draft of a prompt from an unrelated domain) vs natural agreements (paired
   with the draft of another prompt of the same domain), at the threshold the system chose on the
   *validation* split, and
   the best-F1 threshold on test for reference (:func:`taskmoe.eval.fusion.calibrate_disagreement`).
3. **Coding adapter and intent**: code-domain target perplexity with vs without the adapter, and
   the intent head's accuracy (:func:`taskmoe.eval.fusion.adapter_eval`).

The same measurements run on either summarizer: the SSM summarizer of a from-scratch system, or the
summarizer of a backbone system (a fusion LoRA adapter of the pretrained backbone reading the drafts
in its chat template, :mod:`taskmoe.training.recipes.backbone_summarizer`), each written to its own
section of docs/benchmarks.md (``fusion`` / ``fusion_backbone``).

Usage::

    python -m bench.fusion                 # runs/quickstart (trains it first if missing, ~10 min)
    python -m bench.fusion --run PATH      # any run folder with a summarizer (a backbone run too)
    python -m bench.fusion --quick         # the --tiny quickstart preset in a temp folder (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench._report import load_note, md_table, write_section
from taskmoe.data.commands import get_corpus
from taskmoe.eval.fusion import adapter_eval, calibrate_disagreement, fusion_perplexity, heldout_pairs
from taskmoe.inference.loader import load_system
from taskmoe.io import read_json
from taskmoe.training.recipes.quickstart import PRESETS, run_quickstart

START_LOAD = load_note()  # how busy the machine was when this run started
COLS = ["domain", "examples", "tokens", "summarizer", "summarizer_no_drafts", "top1_expert", "best_selected_expert"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="run folder (built by quickstart if missing)")
    ap.add_argument("--quick", action="store_true", help="tiny preset in a temporary folder (smoke test; numbers meaningless)")
    ap.add_argument("--per-domain", type=int, default=60, help="held-out prompts per domain")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--max-docs-per-domain", type=int, default=0,
                    help="corpus cap for the held-out prompts (0: the run's own; a larger cap adds test documents, "
                         "which stay held out: the split is by content hash)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "tiny" if args.quick else "default"
    cfg = PRESETS[preset]
    run = Path(tempfile.mkdtemp(prefix="bench-fusion-")) / "run" if args.quick else args.run
    t0 = time.perf_counter()
    built = ""
    if not (run / "taskmoe.json").is_file() or args.quick:
        run_quickstart(run, cfg, preset=preset, progress=False)
        built = f"built by quickstart ({preset}) in {time.perf_counter() - t0:.0f} s; "
    system = load_system(run)
    if system.summarizer is None:
        raise SystemExit(f"{run}: this system has no summarizer")
    # the same corpus the run was built from (test documents are held out by content hash either way)
    qs = run / "quickstart.json"
    cap = read_json(qs)["config"]["max_docs_per_domain"] if qs.is_file() else cfg.max_docs_per_domain
    cap = args.max_docs_per_domain or cap
    corpus = get_corpus(None, max_docs_per_domain=cap, progress=False)
    backbone = bool(system.meta.get("backbone"))
    rc = system.meta.get("summarizer", {}).get("recipe", {})
    pt, tt = int(rc.get("prompt_tokens", cfg.prompt_tokens)), int(rc.get("target_tokens", cfg.target_tokens))
    pairs = heldout_pairs(corpus.test, system.tokenizer, prompt_tokens=pt, target_tokens=tt, per_domain=args.per_domain)
    t1 = time.perf_counter()
    fusion = fusion_perplexity(system, pairs)
    t2 = time.perf_counter()
    chosen = system.config.disagreement.threshold
    at_chosen = calibrate_disagreement(system, pairs, threshold=chosen)
    best = calibrate_disagreement(system, pairs)
    t3 = time.perf_counter()
    ad = adapter_eval(system, pairs)
    t4 = time.perf_counter()

    allrow = next(r for r in fusion if r["domain"] == "all")
    verdict = ("fusion helps" if allrow["summarizer"] < allrow["best_selected_expert"]
               else "fusion helps against the top-1 expert only" if allrow["summarizer"] < allrow["top1_expert"]
               else "fusion does NOT beat the selected experts")
    drafts_help = allrow["summarizer"] < allrow["summarizer_no_drafts"]
    summ = system.meta.get("summarizer", {})
    kind = (f"the backbone `{system.meta['backbone']}` with a fusion LoRA adapter (r={summ.get('r', '?')}) and a "
            "coding LoRA adapter started from it" if backbone else f"{summ.get('lm', {}).get('n_layers', '?')} SSM layers")
    trained = ""
    if backbone and (run / "reports" / "summarizer.json").is_file():
        sr = read_json(run / "reports" / "summarizer.json")
        trained = (f" The summarizer's training: {sr.get('fusion_steps')} fusion-adapter steps and {sr.get('code_steps')} "
                   f"coding-adapter steps on {sr.get('fusion_pairs', {}).get('train')} fusion examples (batch "
                   f"{rc.get('train', {}).get('batch_size', '?')}); the experts continue `<|bos|> prompt` as they were "
                   "trained, the summarizer answers in the backbone's chat template.")
    body = [
        f"System: `{run}` ({built}{len(system.router.categories)} experts, summarizer {kind}); "
        f"{len(pairs)} held-out test prompts ({pt} prompt tokens -> {tt} target tokens); torch threads "
        f"{torch.get_num_threads()}; machine: {START_LOAD}.{trained}",
        "",
        "### 1. Fusion vs the best single selected expert (target perplexity, lower is better)",
        "",
        md_table([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in fusion], COLS),
        "",
        f"Overall: summarizer {allrow['summarizer']:.2f} vs top-1 expert {allrow['top1_expert']:.2f} vs best selected "
        f"expert (oracle) {allrow['best_selected_expert']:.2f} -> **{verdict}**; the drafts "
        f"{'lower' if drafts_help else 'do not lower'} the summarizer's perplexity "
        f"({allrow['summarizer_no_drafts']:.2f} without them).",
        "",
        "### 2. Disagreement: planted conflicts vs natural agreements",
        "",
        md_table([
            {"threshold": f"{chosen:.3f} (chosen on validation)", "precision": at_chosen["precision"],
             "recall": at_chosen["recall"], "f1": at_chosen["f1"]},
            {"threshold": f"{best['threshold']:.3f} (best F1 on test, reference)", "precision": best["precision"],
             "recall": best["recall"], "f1": best["f1"]},
        ]),
        "",
        f"{at_chosen['planted']} planted conflicts (mean D {at_chosen['planted_mean_score']:.3f}) vs {at_chosen['natural']} "
        f"natural agreements (mean D {at_chosen['natural_mean_score']:.3f}); disagreement D = 1 - (0.7 S_sem + 0.3 S_int).",
        "",
        "### 3. Coding adapter and intent head",
        "",
        md_table([{"metric": k, "value": v} for k, v in ad.items()]),
        "",
        f"Wall-clock seconds of each part: fusion {t2 - t1:.0f} s, disagreement {t3 - t2:.0f} s, adapter {t4 - t3:.0f} s.",
    ]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        cmd = "python -m bench.fusion" + (" --quick" if args.quick else "") + (f" --run {args.run}" if args.run != Path("runs/quickstart") else "")
        cmd += f" --per-domain {args.per_domain}" + (f" --threads {args.threads}" if args.threads else "")
        cmd += f" --max-docs-per-domain {args.max_docs_per_domain}" if args.max_docs_per_domain else ""
        key, title = (("fusion_backbone", "IMoE fusion on the pretrained backbone (fusion LoRA summarizer vs its LoRA experts)")
                      if backbone else ("fusion", "IMoE fusion, disagreement and coding adapter (summarizer vs experts)"))
        print("written:", write_section(key, title, cmd,
                                        text + ("\n\n_--quick: tiny preset, numbers are a smoke test only._" if args.quick else "")))


if __name__ == "__main__":
    main()
