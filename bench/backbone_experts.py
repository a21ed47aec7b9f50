"""Routed LoRA experts of a real backbone vs the base, vs one compute-matched LoRA, vs the c-BTM ensemble.

On the embedded default corpus (4 domains), with SmolLM2-135M-Instruct as the frozen backbone:

- **router**: tf-idf (c-BTM) router on the backbone's tokenizer, 4 categories discovered without labels;
- **(a) base**: the backbone alone;
- **(b) routed experts**: one rank-``r`` LoRA per category, ``steps`` steps of ``batch`` windows of
  ``seq_len`` tokens each (multi-category documents to each, fallback to all:
  :func:`taskmoe.experts.assign.route_documents`); each held-out window is scored by its top-1 expert;
- **(c) one LoRA on all data, compute-matched**: rank ``4 r`` (the same total adapter parameters as the
  4 experts) trained ``4 x steps`` steps of the same batch (the same total tokens) on every training window;
- **(d) c-BTM ensemble**: ``log sum_e w_e p_e(y)`` with the router's confidences as weights.

Held-out perplexity is token-weighted over the first ``eval_windows`` windows of each domain's test and
validation documents (windows routed by their own tokens). LegalBench (``../shared/data/legal_qa``, scored for the
base and the routed system): **hearsay** balanced accuracy from the Yes / No log-probabilities of the
assistant's first token after the backbone's chat template (the 5 train examples as few-shot turns),
and **rule_qa** mean log-likelihood per token of the reference answer as the assistant's turn.

Run: ``python -m bench.backbone_experts --backbone runs/backbones/smollm2`` (~25 min on 2 loaded cores at
the defaults). Writes the ``backbone_experts`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench._report import bench_parser, command, load_note, md_table, parse_bench_args, write_section
from taskmoe.data import load_default_corpus
from taskmoe.data.backbone_tokenizer import BackboneTokenizer
from taskmoe.eval.nll import perplexity
from taskmoe.experts.adapter_expert import AdapterExpert
from taskmoe.experts.ensemble import mixture_logprobs
from taskmoe.layers.lora import use_adapter
from taskmoe.models.adapters import load_adapter
from taskmoe.models.backbones import load_backbone
from taskmoe.training.recipes.backbone_experts import (AdapterExpertsConfig, BackboneExpertsSetup, setup,
                                                       train_expert)
from taskmoe.training.recipes.routed_corpus import _windows
from taskmoe.training.recipes.router import build_config, train_router

START_LOAD = load_note()  # how busy the machine was when this run started

Scorer = Callable[[torch.Tensor], torch.Tensor]  # ids (1, T) -> logits (1, T, V)


def base_scorer(base: torch.nn.Module) -> Scorer:
    def run(ids: torch.Tensor) -> torch.Tensor:
        with use_adapter(base, None):
            return base(ids).logits

    return run


def expert_scorer(expert: AdapterExpert) -> Scorer:
    return lambda ids: expert(ids).logits


@torch.no_grad()
def window_nll(logits: torch.Tensor, window: torch.Tensor) -> tuple[float, int]:
    logp = torch.log_softmax(logits[0].float(), -1)
    y = window[1:]
    return float(-logp.gather(-1, y[:, None]).sum()), int(y.numel())


@torch.no_grad()
def continuation_logprobs(score: Scorer, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """log p(cont_t | prompt, cont_<t) for each continuation token, (len(cont),)."""
    ids = torch.tensor([prompt + cont])
    logp = torch.log_softmax(score(ids)[0, len(prompt) - 1 : -1].float(), -1)
    return logp.gather(-1, torch.tensor(cont)[:, None])[:, 0]


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


HEARSAY_RULE = ("Hearsay is an out-of-court statement introduced to prove the truth of the matter asserted. "
                "Answer Yes or No: is the evidence hearsay?")


def hearsay_prompt(tok: BackboneTokenizer, shots: list[dict[str, str]], text: str) -> list[int]:
    msgs: list[dict[str, str]] = []
    for s in shots:
        msgs += [{"role": "user", "content": f"{HEARSAY_RULE}\n{s['text']}"}, {"role": "assistant", "content": s["label"]}]
    msgs.append({"role": "user", "content": f"{HEARSAY_RULE}\n{text}"})
    return tok.encode_chat(msgs)


def balanced_accuracy(gold: list[str], pred: list[str]) -> float:
    labels = sorted(set(gold))
    return sum(sum(g == p == c for g, p in zip(gold, pred)) / max(1, gold.count(c)) for c in labels) / len(labels)


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "a few steps and windows (smoke run)", threads=2)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--out", default="runs/bench_backbone_experts")
    ap.add_argument("--max-docs-per-domain", type=int, default=80)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--reuse", action="store_true",
                    help="load experts already saved in OUT/experts by an earlier run of the same command")
    ap.add_argument("--legal", default="/work/shared/data/legal_qa/legalbench")
    ap.add_argument("--legal-items", type=int, default=0, help="score only the first N hearsay / rule_qa items (0 = all)")
    ap.add_argument("--shots", type=int, default=5, help="hearsay few-shot examples from train.tsv (0-5)")
    args = parse_bench_args(ap, argv)
    if args.quick:
        args.steps, args.eval_windows, args.max_docs_per_domain = 2, 2, 20
    t_start = time.perf_counter()
    out = Path(args.out)
    corpus = load_default_corpus(args.max_docs_per_domain, progress=False)
    tok = BackboneTokenizer.load(args.backbone)
    base, _ = load_backbone(args.backbone)
    base.requires_grad_(False)
    router = train_router(corpus, tok, build_config("tfidf", "4", 256, 0, "", 0, None), progress=False, log=lambda s: None)
    router.save(out / "router")
    tc = AdapterExpertsConfig().train.replace(max_steps=args.steps, batch_size=args.batch, lr=args.lr,
                                              warmup_steps=max(1, args.steps // 10), save_every=0, eval_every=0,
                                              progress=True, log_every=5)
    cfg = AdapterExpertsConfig(r=args.rank, alpha=2.0 * args.rank, seq_len=args.seq_len, train=tc)
    st = setup(out, corpus, args.backbone, cfg, base=base, progress=False, log=print)
    experts: dict[str, AdapterExpert] = {}
    t0 = time.perf_counter()
    reused = []
    for name in router.categories:
        if args.reuse and (out / "experts" / name / "adapter_config.json").is_file():
            load_adapter(base, out / "experts" / name, name=name)
            experts[name] = AdapterExpert(base, name)
            reused.append(name)
            continue
        experts[name], row = train_expert(name, st, resume=False)
        print(row, flush=True)
    t_experts = time.perf_counter() - t0
    # (c): one LoRA, 4x rank (same adapter parameters), 4x steps (same tokens), on every training window
    all_windows = _windows(tok.encode_batch([d.text for d in corpus.train], allow_special=False), tok, args.seq_len)
    n_e = len(router.categories)
    dense_cfg = cfg.replace(r=args.rank * n_e, alpha=2.0 * args.rank * n_e, train=tc.replace(max_steps=args.steps * n_e))
    dense_st = BackboneExpertsSetup(out, Path(args.backbone), base, router, st.assignment, {"all": (all_windows, [])},
                                    dense_cfg)
    t0 = time.perf_counter()
    dense, drow = train_expert("all", dense_st, resume=args.reuse)  # --reuse: continue (or reload) its checkpoint
    t_dense = time.perf_counter() - t0
    print(drow, flush=True)
    params = {"experts": sum(p.numel() for e in experts.values() for p in e.parameters()),
              "dense": sum(p.numel() for p in dense.parameters())}

    names = list(router.categories)
    scorers = {n: expert_scorer(e) for n, e in experts.items()}
    rows = []
    for dom in corpus.domains:
        docs = [d for d in corpus.test + corpus.validation if d.domain == dom]  # held out: never trained on
        wins = _windows(tok.encode_batch([d.text for d in docs], allow_special=False), tok, args.seq_len)[: args.eval_windows]
        acc = {k: [0.0, 0] for k in ("base", "routed", "dense", "ensemble")}
        for w in wins:
            dec = router.route_batch([w.tolist()])[0]
            ids = w[None, :-1]
            logits = {n: scorers[n](ids) for n in names}
            for key, lg in (("base", base_scorer(base)(ids)), ("routed", logits[names[dec.top]]),
                            ("dense", dense(ids).logits)):
                nll, n = window_nll(lg, w)
                acc[key][0] += nll
                acc[key][1] += n
            mix = mixture_logprobs(torch.stack([logits[n][0] for n in names]), torch.tensor(dec.confidences).float())
            y = w[1:]
            acc["ensemble"][0] += float(-mix.gather(-1, y[:, None]).sum())
            acc["ensemble"][1] += int(y.numel())
        row: dict[str, Any] = {"domain": dom, "windows": len(wins)}
        for k, (s, n) in acc.items():
            row[{"base": "(a) base", "routed": "(b) routed experts", "dense": "(c) one LoRA, matched",
                 "ensemble": "(d) c-BTM ensemble"}[k]] = round(perplexity(s / max(1, n)), 2)
        row["(b) vs (a) ppl"] = f"{100 * (row['(b) routed experts'] / row['(a) base'] - 1):+.1f}%"
        if wins:  # a domain whose held-out documents give no full window is left out (said below)
            rows.append(row)
        print(row, flush=True)

    legal_rows = []
    legal = Path(args.legal)
    if (legal / "hearsay" / "test.tsv").is_file():
        shots = read_tsv(legal / "hearsay" / "train.tsv")[: args.shots]
        test = read_tsv(legal / "hearsay" / "test.tsv")
        qa = read_tsv(legal / "rule_qa" / "test.tsv")
        if args.quick:
            test, qa = test[:6], qa[:4]
        if args.legal_items:
            step = max(1, len(test) // args.legal_items)  # evenly spaced: the file is sorted by slice
            test, qa = test[::step][: args.legal_items], qa[: args.legal_items]
        yes, no = tok.encode("Yes")[:1], tok.encode("No")[:1]
        for label, pick in (("base", lambda text: base_scorer(base)),
                            ("routed", lambda text: scorers[names[router.route_batch([tok.encode(text)])[0].top]])):
            preds, gold = [], []
            for ex in test:
                prompt = hearsay_prompt(tok, shots, ex["text"])
                score = pick(ex["text"])
                ly, ln = float(continuation_logprobs(score, prompt, yes)[0]), float(continuation_logprobs(score, prompt, no)[0])
                preds.append("Yes" if ly > ln else "No")
                gold.append(ex["label"])
            tot, cnt = 0.0, 0
            for ex in qa:
                prompt = tok.encode_chat([{"role": "user", "content": ex["text"]}])
                lp = continuation_logprobs(pick(ex["text"]), prompt, tok.encode(ex["answer"]))
                tot, cnt = tot + float(lp.sum()), cnt + int(lp.numel())
            legal_rows.append({"system": label, "hearsay balanced acc": round(balanced_accuracy(gold, preds), 4),
                               "hearsay n": len(test), "rule_qa loglik/token": round(tot / max(1, cnt), 4),
                               "rule_qa n": len(qa)})
            print(legal_rows[-1], flush=True)
    wins_b = sum(r["(b) routed experts"] < r["(a) base"] * 0.85 for r in rows)
    wins_c = sum(r["(b) routed experts"] < r["(c) one LoRA, matched"] for r in rows)
    body = (
        f"SmolLM2-135M-Instruct (frozen, fp32) + LoRA on all 7 projections; default corpus capped at "
        f"{args.max_docs_per_domain} chunks per domain; tf-idf router on the backbone tokenizer, {n_e} categories "
        f"(routing {st.assignment.summary()}). (b): {n_e} experts of rank {args.rank}, {args.steps} steps x {args.batch} "
        f"windows x {args.seq_len} tokens each ({params['experts']:,} adapter parameters in total, "
        + ("trained by an earlier run of this command (its training crashed after the experts, in (c)), loaded here"
           if reused else f"{t_experts:.0f} s") + f"); (c): one rank-{args.rank * n_e} LoRA, {args.steps * n_e} steps of the same batch on all "
        f"{len(all_windows)} training windows ({params['dense']:,} parameters, {t_dense:.0f} s); lr {args.lr}, "
        f"warmup 10% then cosine. Held-out: the first {args.eval_windows} windows of each domain's test + validation documents (never trained on). "
        f"Machine: {START_LOAD}, {torch.get_num_threads()} torch threads; whole run "
        f"{(time.perf_counter() - t_start) / 60:.1f} min.\n\n" + md_table(rows)
        + f"\n\nDomains without a full held-out window at this cap: "
        f"{[d for d in corpus.domains if d not in {r['domain'] for r in rows}] or 'none'}."
        + f"\n\nGoal (b) < (a) by >= 15% on every domain: met on {wins_b} of {len(rows)}; (b) < (c) on >= 3 of 4: "
        f"met on {wins_c} of {len(rows)}.\n"
        + (f"\nLegalBench (hearsay: {args.shots}-shot, Yes/No log-probability of the first assistant token; rule_qa: reference "
           "answer log-likelihood per token as the assistant's turn; the routed system scores with the expert the "
           "router picks for the question):\n\n" + md_table(legal_rows) if legal_rows else "")
    )
    if not args.no_write:
        write_section("backbone_experts", "Routed LoRA experts of a real backbone: base vs experts vs one LoRA vs ensemble",
                      command("backbone_experts", argv), body)
    print(body)


if __name__ == "__main__":
    main()
