"""Cross-talk GAN on two experts of the embedded corpus: does the discriminator stop telling interrupted
text apart once the experts' LoRA adapters are trained against it?

Run: ``python -m bench.crosstalk`` (``--quick`` for a smoke run of about a minute; ``--threads N``,
default 1). Writes the ``crosstalk`` section of ``docs/benchmarks.md`` and the curves to
``docs/img/crosstalk_curves.png``.

Setup (everything trained here, in this run, so the bench needs no prepared run folder):

1. the ``legal`` and ``literature`` domains of :func:`taskmoe.data.load_default_corpus`, a
   byte-level BPE tokenizer on their training text;
2. two experts (:func:`taskmoe.nn.expert_lm`, TCN + linear attention), each trained on its own
   domain with the shared loop (:func:`taskmoe.training.loop.train`); their held-out perplexity
   on both domains shows they specialised;
3. prompts: 32-token windows of each domain; the domain's expert opens, the other one
   interrupts; both router confidences are set to 0.45 (two categories close enough to be
   flagged for cross-talk);
4. the GAN (:func:`taskmoe.training.recipes.crosstalk.train_pair`): LoRA adapters on both
   experts, REINFORCE with a moving-average baseline against a conv discriminator; metrics every
   step.

Measured, before (adapters at their zero init = the base experts) vs after training, on
held-out prompts with the same seeds:

- the final GAN discriminator's accuracy on the before and the after rollouts;
- a *fresh* probe discriminator trained from scratch on rollouts of training prompts and tested on
  the held-out ones (how separable interrupted text is, independent of the co-adapted
  discriminator) -- the baseline of the comparison is the same probe on the base experts;
- perplexity under each base expert of the uninterrupted continuation and of the cross-talk part
  of the interrupted texts (did fooling the discriminator cost fluency?).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._report import ROOT, md_table, write_section
from taskmoe.crosstalk.dialogue import DialogueTokens
from taskmoe.data import PackedLMDataset, load_default_corpus
from taskmoe.data.datasets import pack_documents
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.eval.nll import corpus_nll
from taskmoe.models import ExpertLMConfig, LinearAttentionConfig, expert_lm
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train
from taskmoe.training.losses import lm_cross_entropy
from taskmoe.training.metrics import METRICS_FILE
from taskmoe.training.recipes.crosstalk import (
    CrosstalkPrompts,
    CrosstalkRecipeConfig,
    collect_rollouts,
    cut_prompts,
    discriminator_setup,
    plot_curves,
    probe_accuracy,
    train_pair,
)

DOMAINS = ("legal", "literature")
CONF = 0.45
PLOT = ROOT / "docs" / "img" / "crosstalk_curves.png"


def lm_loss(model, batch):
    out = model(batch[:, :-1])
    return lm_cross_entropy(out.logits, batch[:, 1:]), {"tokens": int(batch[:, 1:].numel())}


def perplexity(model, windows: PackedLMDataset, n: int = 32) -> float:
    idx = torch.linspace(0, len(windows) - 1, min(n, len(windows))).long().tolist()
    x = torch.stack([windows[i] for i in idx])
    return corpus_nll(lambda b: (model(b[:, :-1]).logits, b[:, 1:]), [x], model=model).ppl


def prompts_for(tok: Tokenizer, docs_by_domain: dict, n_per_domain: int, P: int) -> CrosstalkPrompts:
    rows, first = [], []
    for e, dom in enumerate(DOMAINS):
        ids = tok.encode_batch([d.text for d in docs_by_domain[dom]], allow_special=False)
        p, _ = cut_prompts(ids, tok.bos_id, P, n_per_domain)
        rows += p
        first += [e] * len(p)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()  # mix the openers in batches
    return CrosstalkPrompts([rows[i] for i in order], [first[i] for i in order], [(CONF, CONF)] * len(rows))


def sample_text(tok: Tokenizer, t, names) -> str:
    parts = [f"[{names[x.speaker]}{' interrupts' if x.interrupted else ''}] " + tok.decode(list(x.ids), skip_special=True)
             for x in t.turns]
    return " ".join(parts).replace("\n", " ").replace("|", "/")[:400]


def verdict(rep: dict, probe: dict, final_eval: float | None) -> str:
    """One paragraph stating what happened, read off the numbers (thresholds: 0.75 = the discriminator
    learned; a 0.05 drop in accuracy = the generators fooled it more)."""
    d0, d1 = rep["discriminator"]["before"]["d_acc"], rep["discriminator"]["after"]["d_acc"]
    p0, p1 = probe["before"]["d_acc"], probe["after"]["d_acc"]
    learned = final_eval is not None and final_eval >= 0.75
    out = [f"The GAN discriminator {'learned' if learned else 'did not learn'} to tell interrupted texts apart "
           f"(held-out accuracy {final_eval:.2f} at the last evaluation)." if final_eval is not None else ""]
    fooled = d0 - d1 >= 0.05
    out.append(f"On the same held-out prompts it scores {d0:.2f} on the base experts' rollouts and {d1:.2f} on the "
               f"trained adapters' rollouts: the generators {'fool it more than before' if fooled else 'did not learn to fool it'}.")
    out.append(f"A fresh probe discriminator reaches {p0:.2f} on base rollouts and {p1:.2f} on trained ones"
               f" ({'interruptions became harder to detect' if p0 - p1 >= 0.05 else 'no less detectable'}).")
    parts = []
    for name, p in rep["perplexity"].items():
        a, b = p["interrupted_before"], p["interrupted_after"]
        parts.append(f"{a:.0f} -> {b:.0f} under the {name} expert")
    ups = sum(p["interrupted_after"] > p["interrupted_before"] for p in rep["perplexity"].values())
    note = "."
    if ups == len(rep["perplexity"]):
        note = (" (higher under both: fooling the discriminator cost fluency)." if fooled else
                " (higher under both: the adapters moved the text away from both experts without making it pass as "
                "uninterrupted).")
    elif ups == 0:
        note = " (lower under both: the cross-talk reads more like either expert's own text)."
    out.append("Perplexity of the cross-talk part: " + ", ".join(parts) + note)
    return " ".join(x for x in out if x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run to check the bench works (numbers meaningless)")
    ap.add_argument("--expert-steps", type=int, default=None)
    ap.add_argument("--gan-steps", type=int, default=None)
    ap.add_argument("--reward", default="soft", choices=("soft", "hard"))
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate of the GAN (adapters and discriminator)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    expert_steps = args.expert_steps or (30 if q else 250)
    gan_steps = args.gan_steps or (8 if q else 150)
    t_start = time.perf_counter()

    corpus = load_default_corpus(60 if q else None, progress=False)
    train_docs = {d: [x for x in corpus.train if x.domain == d] for d in DOMAINS}
    val_docs = {d: [x for x in corpus.validation if x.domain == d] for d in DOMAINS}
    tok = Tokenizer.train([x.text for d in DOMAINS for x in train_docs[d]], vocab_size=2048, show_progress=False)
    V = tok.vocab_size

    # ---- two experts, one per domain
    lm_cfg = ExpertLMConfig(vocab_size=V, d_model=96, n_layers=4, n_heads=4, attention=LinearAttentionConfig(chunk_size=32))
    experts, expert_rows, val_windows = [], [], {}
    for d in DOMAINS:
        val_windows[d] = PackedLMDataset(pack_documents(tok.encode_batch([x.text for x in val_docs[d]], allow_special=False),
                                                        tok.bos_id, tok.eos_id), 64)
    for i, d in enumerate(DOMAINS):
        torch.manual_seed(i)
        m = expert_lm(lm_cfg)
        data = PackedLMDataset(pack_documents(tok.encode_batch([x.text for x in train_docs[d]], allow_special=False),
                                              tok.bos_id, tok.eos_id), 64)
        t0 = time.perf_counter()
        train(m, lm_loss, data, TrainConfig(max_steps=expert_steps, batch_size=16, lr=3e-3, warmup_steps=10,
                                            progress=False, save_every=0, eval_every=0, seed=i))
        m.eval()
        experts.append(m)
        expert_rows.append({"expert": d, "train s": round(time.perf_counter() - t0, 1),
                            **{f"ppl on {v}": round(perplexity(m, val_windows[v]), 1) for v in DOMAINS}})

    # ---- prompts and the GAN
    P = 32
    train_prompts = prompts_for(tok, train_docs, 32 if q else 512, P)
    held_out = prompts_for(tok, val_docs, 8 if q else 32, P)
    probe_prompts = prompts_for(tok, train_docs, 16 if q else 64, P)
    cfg = CrosstalkRecipeConfig(prompt_tokens=P)
    cfg = cfg.replace(gan=cfg.gan.replace(reward=args.reward),
                      train=cfg.train.replace(max_steps=gan_steps, batch_size=8, lr=args.lr, eval_every=50 if not q else 4,
                                              eval_batches=4, save_every=0, progress=False))
    work = Path(tempfile.mkdtemp(prefix="bench-crosstalk-"))
    t0 = time.perf_counter()
    pr = train_pair(experts, list(DOMAINS), train_prompts, held_out, cfg, work, tokens=DialogueTokens.from_tokenizer(tok))
    gan_s = time.perf_counter() - t0
    png = plot_curves(work / METRICS_FILE, PLOT, title=f"cross-talk GAN: {DOMAINS[0]} <-> {DOMAINS[1]} ({gan_steps} steps)")

    # ---- probes: fresh discriminators on base (before) vs trained (after) rollouts
    gan = pr.gan
    bs = cfg.train.batch_size
    probe = {}
    dcfg, feats = discriminator_setup(experts, cfg)
    probe_after_train = collect_rollouts(gan, probe_prompts, bs, seed=20_000)
    probe["after"] = probe_accuracy(probe_after_train, pr.after, dcfg, features=feats, steps=40 if q else 300)
    saved = {n: p.detach().clone() for n, p in gan.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for n, p in gan.named_parameters():
            if "lora_B" in n:
                p.zero_()  # B = 0: every adapter is the identity, i.e. the base experts
    probe_before_train = collect_rollouts(gan, probe_prompts, bs, seed=20_000)
    with torch.no_grad():
        for n, p in gan.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    probe["before"] = probe_accuracy(probe_before_train, pr.before, dcfg, features=feats, steps=40 if q else 300)

    # ---- report
    import json

    recs = [json.loads(x) for x in (work / METRICS_FILE).read_text().splitlines()]
    tr = [r for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    k = max(1, min(10, len(tr) // 3))
    first_k, last_k = tr[:k], tr[-k:]
    rep = pr.report
    d_before, d_after = rep["discriminator"]["before"], rep["discriminator"]["after"]
    rows = [
        {"measure": "GAN discriminator accuracy (held-out)", "before": d_before["d_acc"], "after": d_after["d_acc"]},
        {"measure": "  on uninterrupted / interrupted", "before": f"{d_before['d_acc_uninterrupted']:.2f} / {d_before['d_acc_interrupted']:.2f}",
         "after": f"{d_after['d_acc_uninterrupted']:.2f} / {d_after['d_acc_interrupted']:.2f}"},
        {"measure": "GAN discriminator mean p(interrupted) on interrupted", "before": d_before["p_detect"], "after": d_after["p_detect"]},
        {"measure": "fresh probe discriminator accuracy (held-out)", "before": probe["before"]["d_acc"], "after": probe["after"]["d_acc"]},
    ]
    for name in DOMAINS:
        p = rep["perplexity"][name]
        rows.append({"measure": f"ppl under {name} expert: cross-talk part", "before": p["interrupted_before"],
                     "after": p["interrupted_after"]})
        rows.append({"measure": f"ppl under {name} expert: uninterrupted continuation", "before": p["uninterrupted"],
                     "after": p["uninterrupted"]})
    rows.append({"measure": "interruptions per interrupted text", "before": rep["interruptions"]["before"],
                 "after": rep["interruptions"]["after"]})
    curve = [{"steps": f"first {k}", "d_acc": statistics.mean(r["d_acc"] for r in first_k),
              "reward": statistics.mean(r["reward"] for r in first_k), "baseline": first_k[-1]["baseline"]},
             {"steps": f"last {k}", "d_acc": statistics.mean(r["d_acc"] for r in last_k),
              "reward": statistics.mean(r["reward"] for r in last_k), "baseline": last_k[-1]["baseline"]}]
    curve += [{"steps": f"held-out @ {r['step']}", "d_acc": r["eval_d_acc"], "reward": r["eval_reward"], "baseline": ""}
              for r in ev]
    names = list(DOMAINS)
    samples = [{"when": w, "text": sample_text(tok, ro[0].fake[0], names)} for w, ro in (("before", pr.before), ("after", pr.after))]
    gcfg = cfg.gan
    body = f"""
Two experts (TCN + linear attention, d=96, 4 layers, vocab {V}) trained {expert_steps} steps each on their own
domain, then {gan_steps} GAN steps (batch 8: 8 uninterrupted + 8 interrupted texts of {gcfg.dialogue.max_new_tokens}
tokens, opening {gcfg.opening_min}-{gcfg.opening_max} tokens, up to {gcfg.dialogue.n_turns} turns, reward `{gcfg.reward}`,
LoRA r={gcfg.lora_rank} on {', '.join(gcfg.lora_targets)}, lr {cfg.train.lr}). {len(train_prompts)} training prompts,
{len(held_out)} held-out prompts (same seeds before and after). GAN time {gan_s:.0f} s, whole bench
{time.perf_counter() - t_start:.0f} s.{' **--quick run: numbers are not meaningful.**' if q else ''}

Experts (held-out perplexity on each domain):

{md_table(expert_rows)}

Before (adapters at zero init = base experts) vs after GAN training:

{md_table(rows, ['measure', 'before', 'after'])}

Training curves (per-step metrics in the run's metrics.jsonl; plot: `docs/img/{PLOT.name}`):

{md_table(curve)}

![cross-talk GAN curves](img/{PLOT.name})

One held-out interrupted text before and after (first prompt):

{md_table(samples)}

**Outcome.** {verdict(rep, probe, ev[-1]["eval_d_acc"] if ev else None)}

Reading: accuracy 0.5 means the discriminator cannot tell interrupted text from an expert writing alone. The
GAN discriminator co-adapts with the generators, so the fresh probe (trained from scratch on rollouts of other
prompts) is the fairer before/after comparison.
"""
    write_section("crosstalk", "Cross-talk GAN: fluent interruptions (discriminator accuracy, reward, perplexity)",
                  "python -m bench.crosstalk" + (" --quick" if q else ""), body)
    print(md_table(rows, ["measure", "before", "after"]))
    print(md_table(curve))
    print(f"plot: {png}\nwork dir: {work}")


if __name__ == "__main__":
    main()
