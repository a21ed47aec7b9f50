"""Chunked (fast) forms against their plain-loop ``*_ref`` twins at T = 1024, forward and forward+backward.

Shapes (batch-first): linear attention B=4, H=4, d=64 with a data-dependent decay; selective scan
B=2, E=512, N=16; causal conv B=4, C=512, K=3, dilation 4. Each pair is timed in the same run; the
goal is >= 10x for the chunked forms. Run: ``python -m bench.ops_twins`` (``--quick`` for fewer
repeats).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench._report import bench_parser, command, parse_bench_args, md_table, timeit, write_section
from taskmoe.ops import (causal_conv, causal_conv_ref, linear_attention, linear_attention_ref, selective_scan,
                         selective_scan_ref)


def cases(T: int) -> dict:
    B, H, d = 4, 4, 64
    la = dict(q=torch.randn(B, T, H, d) * 0.1, k=torch.randn(B, T, H, d) * 0.1, v=torch.randn(B, T, H, d),
              g=F.logsigmoid(torch.randn(B, T, H) + 3))
    b, E, N = 2, 512, 16
    ss = dict(x=torch.randn(b, T, E), dt=F.softplus(torch.randn(b, T, E) - 2), A=-torch.rand(E, N) * 4,
              Bm=torch.randn(b, T, N), Cm=torch.randn(b, T, N))
    cc = dict(x=torch.randn(4, T, 512), weight=torch.randn(512, 3), bias=torch.randn(512))
    return {
        "linear_attention (chunk 64)": (linear_attention, linear_attention_ref, la, {"chunk_size": 64}, {}),
        "selective_scan (auto chunk)": (selective_scan, selective_scan_ref, ss, {}, {}),
        "causal_conv (conv1d)": (causal_conv, causal_conv_ref, cc, {"dilation": 4}, {"dilation": 4}),
    }


def fwd_bwd(fn, inputs, kw):
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}

    def run():
        out, state = fn(**leaves, **kw)
        (out.sum() + state.sum()).backward()

    return run




def main(argv: list[str] | None = None) -> list[dict]:
    ap = bench_parser(__doc__, "fewer repeats (smoke run)")
    args = parse_bench_args(ap, argv)
    T = 1024
    kw_time = dict(warmup=1, repeat=1, min_time=0.0) if args.quick else dict(warmup=1, repeat=3, min_time=0.5)
    rows = []
    for name, (fast, ref, inputs, fkw, rkw) in cases(T).items():
        with torch.no_grad():
            f_fast = timeit(lambda: fast(**inputs, **fkw), **kw_time)
            f_ref = timeit(lambda: ref(**inputs, **rkw), **kw_time)
        b_fast = timeit(fwd_bwd(fast, inputs, fkw), **kw_time)
        b_ref = timeit(fwd_bwd(ref, inputs, rkw), **kw_time)
        rows.append({"op (T=1024)": name, "fast fwd ms": f_fast * 1e3, "loop fwd ms": f_ref * 1e3,
                     "fwd speedup": f"{f_ref / f_fast:.1f}x", "fast fwd+bwd ms": b_fast * 1e3,
                     "loop fwd+bwd ms": b_ref * 1e3, "fwd+bwd speedup": f"{b_ref / b_fast:.1f}x"})
        print(rows[-1], flush=True)
    body = (f"T = {T}; shapes in `bench/ops_twins.py`. Both forms compute the same outputs and final states "
            f"(checked in `tests/ops`). Goal: chunked >= 10x the loop.\n\n{md_table(rows)}\n"
            + ("\n_Quick smoke run (single samples) on a shared machine: noisy; rerun without `--quick`._\n"
               if args.quick else ""))
    if not args.no_write:
        write_section("ops_twins", "Chunked ops vs plain-loop twins", command("ops_twins", argv), body)
    return rows


if __name__ == "__main__":
    main()
