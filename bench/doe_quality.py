"""DOE on the embedded corpus: do the gates split the domains, and what does it cost in perplexity?

Trains a DOE transformer (sequence-routed experts, gates learned from the LM loss alone) and a
dense transformer with the same active parameters for the same steps on the same windows, then
reports held-out perplexity of both and NMI/purity of expert choice vs the true domain (which
the gates never see). Writes its section of docs/benchmarks.md.

    python -m bench.doe_quality [--steps 500] [--quick]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench._report import bench_parser, command, parse_bench_args, md_table, write_section
from taskmoe.training.recipes.doe import train_doe


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "60 steps on a capped corpus (smoke run)")
    ap.add_argument("--steps", type=int, default=500)
    args = parse_bench_args(ap, argv)
    steps = 60 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as d:
        s = train_doe(out=Path(d), steps=steps, max_docs_per_domain=200 if args.quick else None, progress=False)
    rows = [
        {"model": "DOE (4 experts, sequence-routed)", "active params": s["params_active"],
         "val ppl": s["doe_val_ppl"]},
        {"model": "dense transformer (same active size)", "active params": s["dense_params"], "val ppl": s["dense_val_ppl"]},
    ]
    body = (
        f"{steps} steps each, batch 16 x 256 tokens, d_model 128, 4 layers, vocab 8192 (default corpus).\n\n"
        + md_table(rows)
        + f"\n\nExpert choice vs true domain on validation: NMI {s['nmi_expert_vs_domain']:.3f}, purity {s['purity']:.3f}, "
        f"sequences no gate accepted (sent to the best-scoring expert): {s['fallback_rate']:.1%}. "
        f"Ratio DOE/dense perplexity: {s['doe_val_ppl'] / s['dense_val_ppl']:.3f} (below 1 is better for DOE)."
    )
    print(body)
    if not args.no_write:
        write_section("doe_quality", "DOE: domain split by the gates and perplexity vs dense", command("doe_quality", argv), body)
    return s


if __name__ == "__main__":
    main()
