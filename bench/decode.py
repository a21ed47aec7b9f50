"""Per-token decode cost vs context length: expert_lm and summarizer_lm against transformer_lm + KV cache.

All three models have the same width and depth (d_model 256, 4 layers, 4 heads, vocab 8192, as in
the issue's GPT-2 reference point). For each context length the prompt is prefilled in pieces of
256 tokens (the recurrent models' chunked form; the transformer fills its KV cache), then the
median time of one batched decode step (batch 8, one token per row, ``torch.inference_mode``) is
measured. Recurrent models should stay flat; the transformer grows with its cache.

Run: ``python -m bench.decode`` (``--quick`` for a short smoke run, ``--threads N`` to pin threads).
"""

from __future__ import annotations

import sys
import time

import torch

from bench._report import bench_parser, command, parse_bench_args, md_table, write_section
from taskmoe.models import LMConfig, expert_lm, summarizer_lm, transformer_lm

BUILDERS = {"expert_lm": expert_lm, "summarizer_lm": summarizer_lm, "transformer_lm": transformer_lm}


def prefill(model, ctx: int, batch: int, piece: int = 256):
    ids = torch.randint(0, model.vocab_size, (batch, ctx))
    state = model.init_state(batch)
    with torch.inference_mode():
        for s in range(0, ctx, piece):
            state = model(ids[:, s : s + piece], state, logits_to_keep=1).state
    return state


def step_ms(model, state, batch: int, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``steps`` consecutive decode steps (ms/step)."""
    tok = torch.randint(0, model.vocab_size, (batch, 1))
    samples = []
    with torch.inference_mode():
        for r in range(repeats + 1):
            st = state.clone()
            t0 = time.perf_counter()
            for _ in range(steps):
                st = model(tok, st, logits_to_keep=1).state
            if r:  # the first repeat warms up caches and the decode weight copies
                samples.append((time.perf_counter() - t0) / steps * 1e3)
    samples.sort()
    return samples[len(samples) // 2]




def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "fewer steps and repeats (smoke run)")
    args = parse_bench_args(ap, argv)
    batch = 8
    contexts = [32, 512, 1024, 4096]
    steps, repeats = (16, 3) if args.quick else (32, 7)
    cfg = LMConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4)
    models = {name: b(cfg).eval() for name, b in BUILDERS.items()}
    rows = []
    for ctx in contexts:
        row = {"context": ctx}
        for name, model in models.items():
            row[f"{name} ms"] = step_ms(model, prefill(model, ctx, batch), batch, steps, repeats)
        tr = row["transformer_lm ms"]
        row["expert speedup"] = f"{tr / row['expert_lm ms']:.2f}x"
        row["summarizer speedup"] = f"{tr / row['summarizer_lm ms']:.2f}x"
        rows.append(row)
        print(row, flush=True)
    params = {n: f"{m.num_params() / 1e6:.2f}M" for n, m in models.items()}
    body = (
        f"Batch {batch}, one token per row per step, `torch.inference_mode`; d_model 256, 4 layers, 4 heads, "
        f"vocab 8192 (params: {', '.join(f'{k} {v}' for k, v in params.items())}). "
        f"Median of {repeats} runs of {steps} consecutive steps after a chunked prefill of the context.\n"
        f"Goal: flat in context for ours, >= 2x faster than the transformer at 1024.\n\n"
        f"{md_table(rows)}\n"
        + ("\n_Quick smoke run (fewer steps) on a shared machine: timings are noisy; rerun without "
           "`--quick` on a quiet machine._\n" if args.quick else "")
    )
    if not args.no_write:
        write_section("decode", "Decode cost per token vs context", command("decode", argv), body)
    return {"rows": rows}


if __name__ == "__main__":
    main()
