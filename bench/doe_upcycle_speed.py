"""Benchmark: decode speed of an upcycled DOE backbone — grouped sequence routing vs token-level top-1 vs dense.

Same run, same backbone, same experts (``base`` + two LoRA experts on the MLPs of blocks >= gate_layer,
random non-zero LoRA weights: speed does not depend on their values), batch of 16 sequences, a
32-token prompt prefilled, then greedy decode steps timed (tokens/s = 16 x steps / seconds):

- **dense**: the backbone itself (no experts);
- **DOE grouped**: every sequence routed (once, from its prompt) to the same expert -> the
  ``SequenceMoE`` fast path runs that expert on the whole batch (no gather/scatter);
- **DOE mixed**: half the batch to each LoRA expert (the sorted-dispatch path);
- **token-level top-1**: the same experts and the same gate vectors, but every token picks its own
  expert (argmax over ``w_e . norm(h_t) + b_e``) at every layer and step and is dispatched by
  sorting tokens by expert and scaled by its gate probability (Switch-style).

Usage::

    python -m bench.doe_upcycle_speed --backbone runs/backbones/smollm2
    python -m bench.doe_upcycle_speed --quick    # tiny random backbone
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from bench._report import bench_parser, command, load_note, md_table, parse_bench_args, write_section
from taskmoe.doe.seq_moe import SequenceGate
from taskmoe.doe.upcycle import add_backbone_expert, upcycle_config, upcycle_model
from taskmoe.models.backbones import load_backbone, read_backbone_config
from taskmoe.models.model import CausalLM

START_LOAD = load_note()  # how busy the machine was when this run started


class TokenTop1(nn.Module):
    """Token-level top-1 MoE over the same experts and gate vectors (the baseline; no loop over tokens)."""

    def __init__(self, experts: nn.ModuleDict, gate: SequenceGate) -> None:
        super().__init__()
        self.experts, self.gate = experts, gate
        self.names = list(experts.keys())

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        hn = self.gate.norm(flat)
        logits = torch.stack([hn @ self.gate.weight[n] + self.gate.bias[n] for n in self.names], 1)  # (N, E)
        p, e = torch.sigmoid(logits).max(1)
        order = torch.argsort(e, stable=True)
        counts = torch.bincount(e, minlength=len(self.names)).tolist()
        xs = flat.index_select(0, order)
        outs = [self.experts[n](chunk) for n, chunk in zip(self.names, xs.split(counts)) if chunk.shape[0]]
        y = torch.cat(outs) * p.index_select(0, order).unsqueeze(1)
        return torch.empty_like(y).index_copy_(0, order, y).view(B, T, D)


@torch.inference_mode()
def decode_tps(model: nn.Module, prompt: Tensor, steps: int, **prefill_kw) -> float:
    state = model.init_state(prompt.shape[0])
    out = model(prompt, state, logits_to_keep=1, **prefill_kw)
    state, tok = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, state, logits_to_keep=1)
        state, tok = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
    return prompt.shape[0] * steps / (time.perf_counter() - t0)


def build(backbone_dir: Path, gate_layer: int) -> tuple[CausalLM, nn.Module, CausalLM]:
    dense, _ = load_backbone(backbone_dir)
    lm, _ = load_backbone(backbone_dir)
    doe = upcycle_model(lm, upcycle_config(backbone_dir, read_backbone_config(backbone_dir), gate_layer=gate_layer,
                                           max_experts=1, lora_rank=16, lora_alpha=32.0))
    for name in ("legal", "chat"):
        add_backbone_expert(doe, name, "lora")
        with torch.no_grad():
            for p in doe.expert_parameters(name):
                p.normal_(0, 0.02)
    doe.eval()
    tok = copy.deepcopy(doe)
    for i in tok.moe_layers:
        tok.blocks[i].mlp = TokenTop1(tok.blocks[i].mlp.experts, tok.gate)
    token = CausalLM(tok.embedding, list(tok.blocks), tok.norm, config=tok.config, lm_head=tok.lm_head).eval()
    return dense.eval(), doe, token


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "tiny random backbone (smoke test)", threads=2)
    ap.add_argument("--backbone", type=Path, default=Path("runs/backbones/smollm2"))
    ap.add_argument("--gate-layer", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    args = parse_bench_args(ap, argv)
    if args.quick:
        from tests.models.backbones.backbone_helpers import write_hf_backbone

        args.backbone = Path(tempfile.mkdtemp(prefix="bench-upspeed-")) / "bb"
        write_hf_backbone(args.backbone, num_hidden_layers=3)
        args.gate_layer, args.steps, args.repeat = 1, 8, 1
    dense, doe, token = build(args.backbone, args.gate_layer)
    B = args.batch
    prompt = torch.randint(0, dense.vocab_size, (B, 32))
    E = len(doe.expert_names)
    j = doe.expert_names.index("legal")
    grouped = torch.zeros(B, E, dtype=torch.long)
    grouped[:, j] = 1
    mixed = torch.zeros(B, E, dtype=torch.long)
    mixed[: B // 2, j] = 1
    mixed[B // 2 :, doe.expert_names.index("chat")] = 1
    runs = {"dense backbone": lambda: decode_tps(dense, prompt, args.steps),
            "DOE grouped (all rows -> legal)": lambda: decode_tps(doe, prompt, args.steps, force=grouped),
            "DOE mixed (8 legal / 8 chat)": lambda: decode_tps(doe, prompt, args.steps, force=mixed),
            "token-level top-1 (same experts)": lambda: decode_tps(token, prompt, args.steps)}
    best = {k: 0.0 for k in runs}
    for _ in range(args.repeat):  # interleaved, best of repeats (a loaded machine)
        for k, fn in runs.items():
            best[k] = max(best[k], fn())
    d, g, t = best["dense backbone"], best["DOE grouped (all rows -> legal)"], best["token-level top-1 (same experts)"]
    rows = [{"model": k, "decode tokens/s": v, "x dense": v / d, "x token-level": v / t} for k, v in best.items()]
    body = "\n".join([
        ("**--quick smoke run (tiny random backbone): the numbers mean nothing.**\n" if args.quick else ""),
        f"Backbone `{args.backbone}` ({len(dense.blocks)} blocks; MoE blocks >= {args.gate_layer}: experts base + "
        f"2 LoRA r=16 on gate/up/down), batch {B}, 32-token prompt, {args.steps} greedy decode steps timed, best of "
        f"{args.repeat} interleaved repeats, {torch.get_num_threads()} threads; machine: {START_LOAD}.",
        "",
        md_table(rows),
        "",
        f"Grouped / dense = {g / d:.2f} (goal >= 0.9); grouped / token-level = {g / t:.2f} (goal >= 1.5). "
        f"Load average {os.getloadavg()[0]:.1f} on 2 cores at the end of the run: each figure is the best of "
        f"{args.repeat} short runs, so differences of tens of percent can be scheduling noise.",
    ])
    print(body)
    if not args.no_write:
        write_section("doe_upcycle_speed", "Upcycled DOE backbone: decode speed of grouped vs token-level routing",
                      command("doe_upcycle_speed", argv), body)


if __name__ == "__main__":
    main()
