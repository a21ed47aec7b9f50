"""Router quality with the backbone encoder vs the tf-idf (c-BTM) baseline on the default corpus.

Fits a 4-category router with each encoder on the same documents and reports NMI / purity of
the top category against the true domains (never shown to the router) on train, validation and
test, the fit time and the routing throughput. Rows: tf-idf on our byte-level BPE (the baseline
of ``bench/router_quality.py``), tf-idf on the backbone's own tokenizer (same vocabulary as the
backbone router, so the encoder is the only difference), and the backbone encoder (mean-pooled
hidden states of block ``L``, first ``T`` tokens) at each ``--layers``/``--max-length``.

The 135M backbone's forward is slow on a CPU shared with other jobs (~0.8 s per 128-token
document through 8 blocks on 2 loaded cores), so the corpus is capped (``--max-docs-per-domain``).

Run: ``python -m bench.router_backbone --backbone runs/backbones/smollm2``. Writes the
``router_backbone`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench._report import md_table, write_section
from taskmoe.data import load_default_corpus
from taskmoe.data.backbone_tokenizer import BackboneTokenizer
from taskmoe.data.commands import corpus_tokenizer
from taskmoe.eval.routing import evaluate_routing
from taskmoe.models.backbones import load_backbone
from taskmoe.training.recipes.router import build_config, tokenize, train_router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", required=True, help="backbone folder (taskmoe backbone import)")
    ap.add_argument("--max-docs-per-domain", type=int, default=60)
    ap.add_argument("--layers", default="4,8", help="comma-separated blocks to pool after")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    corpus = load_default_corpus(args.max_docs_per_domain, progress=False)
    bpe = corpus_tokenizer(corpus, args.vocab_size, progress=False)
    btok = BackboneTokenizer.load(args.backbone)
    model, _ = load_backbone(args.backbone)
    runs = [("tf-idf, our BPE", "tfidf", bpe, {}), ("tf-idf, backbone tokenizer", "tfidf", btok, {})]
    runs += [(f"backbone L{L}, T{args.max_length}", "backbone", btok, {"layer": int(L), "max_length": args.max_length})
             for L in args.layers.split(",")]
    rows = []
    for label, kind, tok, over in runs:
        cfg = build_config(kind, "4", d_model=256, steps=0, pretrained_path="", seed=0, config=None)
        cfg = cfg.replace(backbone=cfg.backbone.replace(**over))
        t0 = time.perf_counter()
        router = train_router(corpus, tok, cfg, progress=False, log=lambda s: None, backbone=model)
        row = {"encoder": label, "fit s": round(time.perf_counter() - t0, 1)}
        for split in ("train", "validation", "test"):
            ids, doms = tokenize(tok, corpus.splits[split]), [d.domain for d in corpus.splits[split]]
            t2 = time.perf_counter()
            ev = evaluate_routing(router, ids, doms)
            row[f"NMI {split}"] = round(ev.nmi, 4)
            if split == "test":
                row["purity test"] = round(ev.purity, 4)
                row["route docs/s"] = round(len(ids) / (time.perf_counter() - t2), 1)
        rows.append(row)
        print(row, flush=True)
    n = {s: len(corpus.splits[s]) for s in ("train", "validation", "test")}
    body = (
        f"Default corpus capped at {args.max_docs_per_domain} chunks per domain ({n['train']} train / {n['validation']} "
        f"validation / {n['test']} test, 4 domains), 4 categories, balanced spherical k-means, the same classifier, "
        f"calibration and complexity scorer for every encoder. Backbone: SmolLM2-135M-Instruct (30 blocks, d 576); the "
        f"backbone encoder mean-pools block L's output over the first T tokens (position 0 left out), centred on the "
        f"training mean. {args.threads} torch threads, 2-core box, loaded machine (other jobs running).\n\n"
        + md_table(rows)
    )
    write_section("router_backbone", "Router on the backbone's hidden states vs tf-idf (c-BTM) baseline",
                  f"python -m bench.router_backbone --backbone DIR --max-docs-per-domain {args.max_docs_per_domain} "
                  f"--layers {args.layers} --max-length {args.max_length}", body)


if __name__ == "__main__":
    main()
