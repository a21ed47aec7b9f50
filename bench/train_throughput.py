"""Training throughput and model FLOPs utilization (MFU) against the machine's fp32 matmul peak.

MFU = 6 * params * tokens/s / peak, where peak is the best fp32 GFLOP/s of a large square matmul
measured in the same run with the same thread count (6 = forward 2 + backward 4 FLOPs per
parameter per token; the tied head is counted once, as its matmul is done once). Each model is
trained with AdamW on random token batches (batch 8 x 256 tokens) at width 512, 4 layers; the
attention baseline (ours, and Hugging Face GPT-2 when ``transformers`` is installed) runs in the
same process. Goal: expert_lm >= 40% of peak.

Run: ``python -m bench.train_throughput`` (``--quick`` for fewer steps, ``--threads N``).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from bench._report import bench_parser, command, parse_bench_args, md_table, write_section
from taskmoe.models import LMConfig, expert_lm, summarizer_lm, transformer_lm


def matmul_peak(n: int, repeats: int) -> float:
    """Best observed fp32 FLOP/s of an (n x n) @ (n x n) matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


class HFGPT2(torch.nn.Module):
    """Hugging Face GPT-2 of the same width/depth, as an external reference (optional)."""

    def __init__(self, cfg: LMConfig, seq: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.m = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                                            n_head=cfg.n_heads, n_positions=seq, bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0,
                                            resid_pdrop=0.0))

    def forward(self, ids):
        return self.m(input_ids=ids)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def tokens_per_second(model, vocab: int, batch: int, seq: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1))
    model.train()

    def step() -> None:
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return batch * seq / times[len(times) // 2]




def main(argv: list[str] | None = None) -> list[dict]:
    ap = bench_parser(__doc__, "fewer timed steps (smoke run)")
    args = parse_bench_args(ap, argv)
    batch, seq = 8, 256
    steps = 2 if args.quick else 6
    cfg = LMConfig(vocab_size=8192, d_model=512, n_layers=4, n_heads=8)
    peak_repeats = 3 if args.quick else 10
    peak = matmul_peak(2048, peak_repeats)  # re-measured after each model; the best sample counts
    models = {"expert_lm": lambda: expert_lm(cfg), "summarizer_lm": lambda: summarizer_lm(cfg),
              "transformer_lm": lambda: transformer_lm(cfg)}
    try:
        import transformers  # noqa: F401

        models["HF GPT-2 (reference)"] = lambda: HFGPT2(cfg, seq)
    except ImportError:
        pass
    rows = []
    for name, make in models.items():
        model = make()
        n = model.num_params()
        tps = tokens_per_second(model, cfg.vocab_size, batch, seq, steps)
        rows.append({"model": name, "params": f"{n / 1e6:.2f}M", "tokens/s": tps, "GFLOP/s (6N)": 6 * n * tps / 1e9})
        print(rows[-1], flush=True)
        del model
        peak = max(peak, matmul_peak(2048, peak_repeats))
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    for row in rows:
        row["fraction of peak"] = f"{row['GFLOP/s (6N)'] * 1e9 / peak:.0%}"
    body = (f"Width 512, 4 layers, 8 heads, vocab 8192; batch {batch} x {seq} tokens; AdamW; fp32. "
            f"Measured fp32 matmul peak (2048^3, same run, {torch.get_num_threads()} threads): "
            f"**{peak / 1e9:.1f} GFLOP/s**. Goal: expert_lm >= 40% of peak.\n\n{md_table(rows)}\n"
            + ("\n_Quick smoke run (few steps) on a shared machine: noisy; rerun without `--quick`._\n"
               if args.quick else ""))
    if not args.no_write:
        write_section("train_throughput", "Training throughput and fraction of matmul peak",
                      command("train_throughput", argv), body)
    return rows


if __name__ == "__main__":
    main()
