"""Benchmark: LoRA SFT then DPO of the backbone, against the untouched backbone in the same run.

``taskmoe train sft`` on ``shared/data/sft/alpaca_data_cleaned_1000.json`` then ``taskmoe train dpo``
(continuing the SFT adapter; reference = the SFT adapter frozen) on
``shared/data/dpo/hh_rlhf_harmless_base_test.jsonl.gz``, both on the backbone (SmolLM2-135M-Instruct
by default) with small step counts. Rows: base backbone, +SFT, +SFT+DPO; columns: held-out Alpaca
reference-answer log-likelihood per token and held-out hh-rlhf preference accuracy (the examples the
trainers held out, :func:`taskmoe.data.sft.split_examples`), training tokens/s and the DPO reward
margin/accuracy on its held-out pairs.

Usage::

    python -m bench.chat_tuning --backbone backbones/smollm2     # imported first if missing
    python -m bench.chat_tuning --quick                          # a tiny random backbone-free model (smoke test)
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench._report import bench_parser, command, md_table, parse_bench_args, write_section
from taskmoe.data.formats import read_alpaca, read_preferences
from taskmoe.data.sft import split_examples
from taskmoe.eval.chat_quality import preference_accuracy, reference_loglik
from taskmoe.eval.legal import load_eval_model
from taskmoe.training.recipes.dpo import train_dpo
from taskmoe.training.recipes.sft import train_sft


def _shared() -> Path:
    env = os.environ.get("TASKMOE_SHARED")
    for p in ([Path(env)] if env else []) + [Path("../shared"), Path(__file__).resolve().parents[2] / "shared"]:
        if (p / "data").is_dir():
            return p / "data"
    raise SystemExit("needs the shared data folder (set TASKMOE_SHARED)")


def _base(args, work: Path) -> Path:
    if args.quick:
        from taskmoe.data.tokenizer import Tokenizer
        from taskmoe.models import LMConfig, save_lm, transformer_lm

        tok = Tokenizer.train([r.response for r in read_alpaca(_shared() / "sft" / "alpaca_data_cleaned_1000.json")[:200]],
                              600, show_progress=False)
        save_lm(transformer_lm(LMConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=2)), work / "base")
        tok.save(work / "base")
        return work / "base"
    if not (args.backbone / "config.json").is_file():
        from taskmoe.models.backbones import import_backbone

        import_backbone(out=args.backbone)
    return args.backbone


def _quality(folder: Path, alpaca, prefs, max_len: int) -> dict:
    model, tok = load_eval_model(folder)
    return {"alpaca_ll_per_token": reference_loglik(model, tok, alpaca, max_len=max_len)["mean_ll_per_token"],
            "preference_accuracy": preference_accuracy(model, tok, prefs, max_len=max_len)["accuracy"]}


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "tiny random model, few steps (smoke test; numbers meaningless)", threads=2)
    ap.add_argument("--backbone", type=Path, default=Path("backbones/smollm2"))
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--dpo-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parse_bench_args(ap, argv)
    if args.quick:
        args.sft_steps, args.dpo_steps, args.held_out = 4, 3, 8
    data = _shared()
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-chat-"))
    base = _base(args, work)
    alpaca_file, pref_file = data / "sft" / "alpaca_data_cleaned_1000.json", data / "dpo" / "hh_rlhf_harmless_base_test.jsonl.gz"
    _, alpaca = split_examples(read_alpaca(alpaca_file), args.held_out, 0)
    _, prefs = split_examples(read_preferences(pref_file), args.held_out, 0)
    common = dict(max_len=args.max_len, val_examples=args.held_out, batch_size=args.batch_size, seed=0, progress=False)
    t0 = time.perf_counter()
    sft = train_sft(base, alpaca_file, work / "sft", steps=args.sft_steps, lr=5e-4, **common)
    dpo = train_dpo(base, pref_file, work / "dpo", adapter=work / "sft" / "adapter", steps=args.dpo_steps, lr=2e-4,
                    beta=0.1, **common)
    train_s = time.perf_counter() - t0
    rows = [{"model": "base backbone", **_quality(base, alpaca, prefs, args.max_len)},
            {"model": f"+ SFT LoRA ({args.sft_steps} steps)", **_quality(work / "sft", alpaca, prefs, args.max_len),
             "train_tokens_per_s": sft["tokens_per_s"]},
            {"model": f"+ SFT + DPO ({args.dpo_steps} steps)", **_quality(work / "dpo", alpaca, prefs, args.max_len),
             "train_tokens_per_s": dpo["tokens_per_s"]}]
    body = (
        f"Model: `{base}`{' (tiny random model: smoke test, numbers meaningless)' if args.quick else ''}; "
        f"LoRA r=8 on every attention and MLP projection, batch {args.batch_size}, max_len {args.max_len}, "
        f"{args.held_out} held-out examples each. Loaded machine (other jobs running); training took {train_s:.0f} s.\n\n"
        f"{md_table(rows, ['model', 'alpaca_ll_per_token', 'preference_accuracy', 'train_tokens_per_s'])}\n\n"
        f"SFT loss {sft['first_loss']:.3f} -> {sft['last_loss']:.3f}; DPO loss {dpo['first_loss']:.3f} -> "
        f"{dpo['last_loss']:.3f}, held-out reward margin {dpo.get('eval_reward_margin', float('nan')):.3f}, "
        f"reward accuracy {dpo.get('eval_reward_accuracy', float('nan')):.3f}. "
        "train tokens/s counts the assistant tokens the loss averages over (SFT) or both completions' tokens (DPO)."
    )
    print(body)
    if not args.no_write:
        write_section("chat_tuning", "Chat tuning: LoRA SFT and DPO of the backbone", command("chat_tuning", argv), body)


if __name__ == "__main__":
    main()
