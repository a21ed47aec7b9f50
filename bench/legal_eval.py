"""Benchmark: `taskmoe eval legal` on the base backbone, and what prefix caching saves.

1. **Prefix caching vs full forwards** (same run, same items): LegalBench hearsay few-shot label
   scoring of the first ``--items`` test items with the shared prompt prefix prefilled once and
   its state cloned per item (:func:`taskmoe.eval.legal.label_scores`) vs one full forward of
   prompt + label per label and item (:func:`taskmoe.eval.scoring.continuation_logprobs`);
   seconds, speed-up and the largest score difference.
2. **The evaluation itself** (:func:`taskmoe.eval.legal.eval_legal`) on the base backbone: hearsay
   balanced accuracy raw and calibrated (few- and zero-shot, 95% bootstrap CI) and rule_qa mean
   log-likelihood per reference-answer token, with the first five generated answers.

Usage::

    python -m bench.legal_eval --backbone backbones/smollm2   # imported first if missing (SmolLM2-135M-Instruct)
    python -m bench.legal_eval --quick                         # tiny random model on the same files (smoke test)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench._report import bench_parser, command, md_table, parse_bench_args, write_section
from taskmoe.eval.legal import LABELS, eval_legal, hearsay_templates, label_scores, load_eval_model, read_tsv, resolve_legalbench
from taskmoe.eval.scoring import continuation_logprobs


def _model(args) -> Path:
    if args.quick:
        from taskmoe.data.tokenizer import Tokenizer
        from taskmoe.models import LMConfig, save_lm, transformer_lm

        root = Path(tempfile.mkdtemp(prefix="bench-legal-"))
        tok = Tokenizer.train(["Is there hearsay? Yes No the court rule"] * 20, 300, show_progress=False)
        save_lm(transformer_lm(LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2)), root / "m")
        tok.save(root / "m")
        return root / "m"
    if not (args.backbone / "config.json").is_file():
        from taskmoe.models.backbones import import_backbone

        import_backbone(out=args.backbone)
    return args.backbone


def caching(model, tok, root: Path, n: int) -> dict:
    items = read_tsv(root / "hearsay" / "test.tsv", ("label", "text"))[:n]
    few, _ = hearsay_templates((root / "hearsay" / "base_prompt.txt").read_text(encoding="utf-8"))
    contents = [few.replace("{{text}}", r["text"].strip()) for r in items]
    t0 = time.perf_counter()
    cached = label_scores(model, tok, contents)
    t_cached = time.perf_counter() - t0
    labels = [tok.encode(lab, allow_special=False) for lab in LABELS]
    t0 = time.perf_counter()
    full = torch.tensor([continuation_logprobs(model, tok.encode_chat([{"role": "user", "content": c}]), labels)
                         for c in contents], dtype=torch.float64)
    t_full = time.perf_counter() - t0
    return {"items": n, "prompt_tokens": len(tok.encode_chat([{"role": "user", "content": contents[0]}])),
            "cached_s": t_cached, "full_s": t_full, "speedup": t_full / t_cached,
            "max_abs_diff": float((cached - full).abs().max())}


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "tiny random model (smoke test; numbers meaningless)", threads=2)
    ap.add_argument("--backbone", type=Path, default=Path("backbones/smollm2"))
    ap.add_argument("--items", type=int, default=20, help="hearsay items in the caching comparison")
    args = parse_bench_args(ap, argv)
    root = resolve_legalbench(None)
    path = _model(args)
    model, tok = load_eval_model(path)
    c = caching(model, tok, root, args.items)
    print(c)
    rep = eval_legal(path, data=root, generate=5, progress=False)
    h, q = rep["hearsay"], rep["rule_qa"]
    rows = []
    for shot in ("few_shot", "zero_shot"):
        for kind in ("raw", "calibrated"):
            r = h[shot][kind]
            rows.append({"prompt": shot, "scores": kind, "balanced_accuracy": r["balanced_accuracy"],
                         "ci95": f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", "predicted_yes": r["predicted_share"]["Yes"],
                         "accuracy": r["accuracy"]})
    answers = "\n".join(f"- Q: {a['question']}\n  - reference: {a['reference']}\n  - generated: {a['generated']!r}"
                        for a in q["answers"])
    body = (
        f"Model: `{path}`{' (tiny random model: smoke test, numbers meaningless)' if args.quick else ''}. "
        f"Loaded machine (other jobs running).\n\n"
        f"**Prefix caching** (hearsay few-shot, first {c['items']} items, prompt {c['prompt_tokens']} tokens): "
        f"{c['cached_s']:.2f} s cached vs {c['full_s']:.2f} s with full forwards, **{c['speedup']:.1f}x**; "
        f"largest score difference {c['max_abs_diff']:.2e} nats.\n\n"
        f"**Hearsay** ({h['items']} items, {h['yes_share_gold']:.0%} Yes; few-shot scoring {h['few_shot']['seconds']:.1f} s):\n\n"
        f"{md_table(rows)}\n\n"
        f"**rule_qa** ({q['questions']} questions, {q['answer_tokens']} reference tokens): mean log-likelihood per "
        f"token {q['mean_ll_per_token']:.3f} nats (mean of per-question means {q['mean_of_question_means']:.3f}).\n\n"
        f"Generated answers (greedy, 48 tokens):\n\n{answers}\n\nWhole evaluation: {rep['seconds']:.0f} s."
    )
    print(body)
    if not args.no_write:
        write_section("legal_eval", "Legal evaluation (LegalBench hearsay, rule_qa) and prefix caching",
                      command("legal_eval", argv), body)


if __name__ == "__main__":
    main()
