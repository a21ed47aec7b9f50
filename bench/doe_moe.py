"""Sequence-routed MoE (``SequenceMoE``) vs Hugging Face's token-routed Mixtral MoE block vs a dense MLP.

Run: ``python -m bench.doe_moe`` (``--quick`` for a short smoke run, ``--threads N``; default 1
thread so ratios do not depend on how busy the other core is). Writes the ``doe_moe`` section of
``docs/benchmarks.md``.

What is compared, at equal shapes (hidden D in {256, 512}, SwiGLU hidden H = LMConfig's default
``64 * ceil(8 D / 3 / 64)``, 8 experts, 16 sequences), all with the *same* expert weights:

- **dense**: one ``taskmoe.nn.SwiGLU(D, H)``: the active parameters of a top-1 MoE layer.
- **mixtral top-k** (k = 1, 2): ``transformers``' ``MixtralSparseMoeBlock``; it routes every token
  at every step. Each of its experts implementations available in this version is timed
  (``eager``, ``grouped_mm``, and ``batched_mm`` at the decode shape only: it gathers a weight copy
  per token, ~3 MB x 4096 tokens at the prefill shape) and the fastest is reported.
- **seq-moe**: ``taskmoe.doe.SequenceMoE``; routing is decided once per sequence from the prompt
  (the prefill timing includes the gate, the pooling and the dispatch plan) and reused at every
  decode step. Schedules: *mixed* (2 sequences per expert, all 8 experts in each batch) and
  *grouped* (a scheduler batched 16 sequences that chose the same expert; order fixed at
  prefill, so no step routes, gathers or scatters). Also the naive per-sequence loop
  (``dispatch_ref``) and the per-expert loop that training uses (inference of a mixed batch uses
  one ``torch.nn.functional.grouped_mm`` per projection over a stacked copy of the weights).
- **end to end**: greedy decode tokens/s of a small ``DOETransformer`` (4 layers, d 256, 8
  experts, 16 prompts of 64 tokens) under both schedules vs the same model with every MoE layer
  replaced by a token-routed Mixtral block holding the same expert weights (top-1), and vs a
  dense transformer of the same active size.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import torch
from torch import nn

from bench._report import md_table, write_section
from taskmoe.doe.model import DOEConfig, build_doe
from taskmoe.doe.routing import Routing
from taskmoe.doe.seq_moe import SequenceGate, SequenceMoE, dispatch, dispatch_ref
from taskmoe.layers import SwiGLU
from taskmoe.models import LMConfig, transformer_lm

E, B = 8, 16
CLOCK = time.process_time  # CPU time of this process: with one thread, immune to other jobs on the machine


def timeit(fn, *, warmup: int = 2, repeat: int = 5, min_time: float = 0.2) -> float:
    """Best (minimum) seconds per call over ``repeat`` samples of at least ``min_time`` each.

    Timed with :data:`CLOCK` (process CPU time when single-threaded, wall time otherwise): on a
    shared machine, other jobs only ever add time, so the minimum of CPU time is the stable figure.
    """
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeat):
        n, t0 = 0, CLOCK()
        while True:
            fn()
            n += 1
            dt = CLOCK() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def hidden_for(d: int) -> int:
    return 64 * math.ceil(8 * d / 3 / 64)


def fixed_routing(names, ids: torch.Tensor, weights: torch.Tensor) -> Routing:
    """A routing with given expert ids (B, K) and weights, as a gate would hand it over."""
    Bn = ids.shape[0]
    scores = torch.zeros(Bn, len(names))
    accepted = torch.zeros(Bn, len(names), dtype=torch.bool)
    accepted.scatter_(1, ids.clamp_min(0), ids >= 0)
    return Routing(tuple(names), ids, weights, scores, accepted, torch.zeros(Bn, dtype=torch.bool))


def mixed_ids(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b -> experts (b, b+1, ...) mod 8: every expert serves 2*k sequences, weights 1/k."""
    ids = torch.stack([(torch.arange(B) + j) % E for j in range(k)], dim=1)
    return ids, torch.full((B, k), 1.0 / k)


# ------------------------------------------------------------------------------ builders
def make_layers(d: int):
    torch.manual_seed(0)
    H = hidden_for(d)
    names = [f"e{i}" for i in range(E)]
    experts = {n: SwiGLU(d, H) for n in names}
    for m in experts.values():
        for p in m.parameters():
            nn.init.normal_(p, std=0.02)
    gate = SequenceGate(d, names, tau=0.5, max_experts=1)
    moe = SequenceMoE(experts, gate=gate).eval()
    dense = SwiGLU(d, H).eval()
    dense.load_state_dict(experts["e0"].state_dict())
    return names, moe, dense, H


def mixtral_block(d: int, H: int, k: int, impl: str, experts: list[nn.Module] | None = None) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=H, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    blk = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        nn.init.normal_(blk.gate.weight, std=0.02)
        for e in range(E):
            src = experts[e] if experts is not None else None
            if src is None:
                nn.init.normal_(blk.experts.gate_up_proj[e], std=0.02)
                nn.init.normal_(blk.experts.down_proj[e], std=0.02)
            else:  # same layout: gate_up (2H, D) with gate first, down (D, H)
                blk.experts.gate_up_proj[e].copy_(src.gate_up.weight)
                blk.experts.down_proj[e].copy_(src.down.weight)
    return blk


def mixtral_impls(shape: str) -> list[str]:
    return ["eager", "grouped_mm"] + (["batched_mm"] if shape == "decode" else [])


# ------------------------------------------------------------------------------- layer bench
def bench_layers(d: int, quick: bool) -> tuple[list[dict], dict]:
    names, moe, dense, H = make_layers(d)
    ordered = moe.ordered(names)
    kw = dict(warmup=1, repeat=3, min_time=0.05) if quick else dict(warmup=2, repeat=5, min_time=0.3)
    kw_big = dict(warmup=1, repeat=1, min_time=0.0) if quick else dict(warmup=1, repeat=3, min_time=0.0)
    rows: list[dict] = []

    def add(shape: str, design: str, seconds: float, tokens: int, note: str = "") -> None:
        rows.append({"D": d, "shape": shape, "design": design, "tok/s": tokens / seconds,
                     "ms/call": seconds * 1e3, "note": note})

    T = 64 if quick else 256
    xp = torch.randn(B, T, d)
    x1 = torch.randn(B, 1, d)
    mixed1, mixed2 = mixed_ids(1), mixed_ids(2)
    grouped = (torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1))
    experts_list = [moe.experts[n] for n in names]
    with torch.inference_mode():
        # ---- prefill (16 x T tokens)
        add("prefill", "dense", timeit(lambda: dense(xp), **kw_big), B * T)

        def seq_prefill(ids_w):
            def run():
                moe.route(xp)  # the gate decision is part of a prefill (then fixed to the benchmark's schedule)
                return moe(xp, fixed_routing(names, *ids_w))[0]
            return run

        add("prefill", "seq-moe mixed top-1", timeit(seq_prefill(mixed1), **kw_big), B * T, "routing included")
        add("prefill", "seq-moe mixed top-2", timeit(seq_prefill(mixed2), **kw_big), B * T, "routing included")
        for k in (1, 2):
            best = None
            for impl in mixtral_impls("prefill"):
                blk = mixtral_block(d, H, k, impl, experts_list)
                s = timeit(lambda: blk(xp), **kw_big)
                if best is None or s < best[0]:
                    best = (s, impl)
            add("prefill", f"mixtral top-{k}", best[0], B * T, f"fastest impl: {best[1]}")

        # ---- decode (16 x 1 token per step); routing fixed at prefill
        add("decode", "dense", timeit(lambda: dense(x1), **kw), B)
        r_grouped = fixed_routing(names, *grouped)
        r_mixed1 = fixed_routing(names, *mixed1)
        r_mixed2 = fixed_routing(names, *mixed2)
        add("decode", "seq-moe grouped", timeit(lambda: moe(x1, r_grouped), **kw), B, "no gather/scatter")
        add("decode", "seq-moe mixed top-1", timeit(lambda: moe(x1, r_mixed1), **kw), B,
            "8 experts per step; grouped_mm over stacked weights")
        add("decode", "seq-moe mixed top-2", timeit(lambda: moe(x1, r_mixed2), **kw), B)
        add("decode", "seq-moe mixed top-1, per-expert loop", timeit(lambda: dispatch(x1, r_mixed1, ordered), **kw), B,
            "one SwiGLU call per expert")
        add("decode", "naive per-sequence loop, mixed", timeit(lambda: dispatch_ref(x1, r_mixed1, ordered), **kw), B)
        for k in (1, 2):
            best = None
            for impl in mixtral_impls("decode"):
                blk = mixtral_block(d, H, k, impl, experts_list)
                s = timeit(lambda: blk(x1), **kw)
                if best is None or s < best[0]:
                    best = (s, impl)
            add("decode", f"mixtral top-{k}", best[0], B, f"fastest impl: {best[1]}")

        # ---- training step at the prefill shape (forward + backward)
    train_rows = []
    xg = xp.clone().requires_grad_(True)

    def train_step(fn):
        def run():
            y = fn()
            y.float().pow(2).mean().backward()
            xg.grad = None
        return run

    moe.train()
    dense.train()
    tr = {"dense": timeit(train_step(lambda: dense(xg)), **kw_big)}
    gate_moe = moe

    def seq_train():
        r = gate_moe.route(xg)  # capacity routing (balanced: 2 sequences per expert at B=16, E=8)
        return gate_moe(xg, r)[0]

    tr["seq-moe (capacity routing)"] = timeit(train_step(seq_train), **kw_big)
    mix = mixtral_block(d, H, 1, "grouped_mm", experts_list).train()
    tr["mixtral top-1 grouped_mm"] = timeit(train_step(lambda: mix(xg)), **kw_big)
    mix_e = mixtral_block(d, H, 1, "eager", experts_list).train()
    tr["mixtral top-1 eager"] = timeit(train_step(lambda: mix_e(xg)), **kw_big)
    for name, s in tr.items():
        train_rows.append({"D": d, "shape": "train fwd+bwd", "design": name, "tok/s": B * T / s, "ms/call": s * 1e3,
                           "note": ""})
    return rows + train_rows, {"T": T}


# ------------------------------------------------------------------------------ end to end
class TokenRoutedMLP(nn.Module):
    """Adapter: a token-routed block as a DOE MLP (takes and returns the routing it ignores)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def init_state(self, batch_size, device=None, dtype=None):
        return None

    def forward(self, x, routing=None):
        return self.block(x), routing


def decode_tps(model, prompts: torch.Tensor, steps: int, routing: Routing | None) -> float:
    """Greedy decode tokens/s after a prefill (the prefill is not timed)."""
    with torch.inference_mode():
        state = model.init_state(prompts.shape[0])
        kw = {} if routing is None else {"routing": routing}
        out = model(prompts, state, logits_to_keep=1, **kw)
        state = out.state
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = CLOCK()
        for _ in range(steps):
            out = model(tok, state, logits_to_keep=1)
            state = out.state
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return prompts.shape[0] * steps / (CLOCK() - t0)


def bench_e2e(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4)
    cfg = DOEConfig(lm=lm, experts=[f"e{i}" for i in range(E)], max_experts=1)
    doe = build_doe(cfg).eval()
    dense = transformer_lm(lm).eval()
    token_models = {}
    for impl in ("eager", "grouped_mm"):
        tok = build_doe(cfg).eval()
        tok.load_state_dict(doe.state_dict())
        for i in tok.moe_layers:  # the same expert weights, routed per token by a Mixtral router
            experts = [tok.moe(i).experts[n] for n in cfg.experts]
            tok.blocks[i].mlp = TokenRoutedMLP(mixtral_block(lm.d_model, cfg.hidden, 1, impl, experts))
        token_models[impl] = tok
    P, steps = (32, 8) if quick else (64, 48)
    prompts = torch.randint(0, lm.vocab_size, (B, P))
    names = cfg.experts
    reps = 1 if quick else 3
    rows = []
    for name, model, routing in [
        ("dense transformer (same active size)", dense, None),
        ("DOE, grouped schedule", doe, fixed_routing(names, torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1))),
        ("DOE, mixed schedule", doe, fixed_routing(names, *mixed_ids(1))),
    ]:
        rows.append({"model": name, "decode tok/s": max(decode_tps(model, prompts, steps, routing) for _ in range(reps))})
    best = max((max(decode_tps(m, prompts, steps, None) for _ in range(reps)), impl) for impl, m in token_models.items())
    rows.append({"model": f"same model, token-level routing (mixtral top-1, fastest impl: {best[1]})",
                 "decode tok/s": best[0]})
    return rows


# ----------------------------------------------------------------------------------- main
def ratio(rows, shape, a, b, d):
    get = lambda n: next(r["tok/s"] for r in rows if r["D"] == d and r["shape"] == shape and r["design"] == n)  # noqa: E731
    return get(a) / get(b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="D=256 only, short prefill and timings (smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    global CLOCK
    torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.threads == 1 else time.perf_counter
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    dims = (256,) if args.quick else (256, 512)
    rows: list[dict] = []
    T = None
    for d in dims:
        print(f"layers, D={d} ...", file=sys.stderr)
        r, info = bench_layers(d, args.quick)
        rows += r
        T = info["T"]
    print("end to end ...", file=sys.stderr)
    e2e = bench_e2e(args.quick)

    goals = []
    for d in dims:
        checks = [
            ("prefill: seq-moe mixed top-1 / dense", ratio(rows, "prefill", "seq-moe mixed top-1", "dense", d), 0.95),
            ("prefill: seq-moe mixed top-1 / mixtral top-1", ratio(rows, "prefill", "seq-moe mixed top-1", "mixtral top-1", d), 1.0),
            ("train: seq-moe / dense", ratio(rows, "train fwd+bwd", "seq-moe (capacity routing)", "dense", d), 0.95),
            ("decode: grouped / dense", ratio(rows, "decode", "seq-moe grouped", "dense", d), 0.8),
            ("decode: grouped / mixtral top-1", ratio(rows, "decode", "seq-moe grouped", "mixtral top-1", d), 5.0),
            ("decode: grouped / mixtral top-2", ratio(rows, "decode", "seq-moe grouped", "mixtral top-2", d), 5.0),
            ("decode: mixed top-1 / mixtral top-1", ratio(rows, "decode", "seq-moe mixed top-1", "mixtral top-1", d), 2.0),
            ("decode: mixed top-2 / mixtral top-2", ratio(rows, "decode", "seq-moe mixed top-2", "mixtral top-2", d), 2.0),
            ("decode: mixed top-1 / naive loop", ratio(rows, "decode", "seq-moe mixed top-1", "naive per-sequence loop, mixed", d), 1.0),
            ("decode: grouped_mm / per-expert loop (mixed top-1)",
             ratio(rows, "decode", "seq-moe mixed top-1", "seq-moe mixed top-1, per-expert loop", d), None),
        ]
        goals += [{"D": d, "ratio": n, "value": v, "goal": "-" if g is None else f">= {g}",
                   "met": "-" if g is None else ("yes" if v >= g else "no")} for n, v, g in checks]
    e2e_base = next(r["decode tok/s"] for r in e2e if r["model"].startswith("same model"))
    for r in e2e:
        r["vs token-level"] = r["decode tok/s"] / e2e_base

    body = (
        ("**Quick smoke run** (`--quick`: D=256, prefill T=64, short timings): it only shows the benchmark runs; "
         "run without `--quick` for the figures.\n\n" if args.quick else "")
        + ("Times are the best of several samples of process CPU time (single thread), so other jobs on the "
           "machine add little noise.\n\n" if args.threads == 1 else "Times are the best of several wall-clock samples.\n\n")
        + f"Layer shapes: 16 sequences, 8 experts, SwiGLU hidden `64*ceil(8D/3/64)`; prefill 16 x {T} tokens, "
        "decode 16 x 1 token per step (routing fixed at prefill for seq-moe; mixtral routes every token every "
        "step). Mixed = 2 sequences per expert in the batch; grouped = all 16 sequences chose one expert.\n\n"
        "### Ratios vs goals\n\n" + md_table(goals) + "\n\n### Layers\n\n"
        + md_table(rows, ["D", "shape", "design", "tok/s", "ms/call", "note"])
        + "\n\n### End to end: greedy decode of a 4-layer d=256 DOETransformer (8 experts, top-1), 16 prompts\n\n"
        + md_table(e2e) + "\n\nNotes: the mixed schedule must read every expert's weights each step (8x a dense "
        "layer's weight traffic), so it cannot approach dense; sequence routing pays off when the scheduler "
        "groups sequences by expert, which token routing cannot do.\n"
    )
    cmd = "python -m bench.doe_moe" + (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
    path = write_section("doe_moe", "DOE: sequence-routed MoE vs token-routed Mixtral block vs dense", cmd, body)
    print(body)
    print(f"written: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
