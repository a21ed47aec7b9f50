"""Benchmark: cohesion — a legal expert (raw law) and a chat expert (SFT, DPO) answering legal questions together.

One run: ``taskmoe cohesion`` (every stage resumable) on the backbone, then every row evaluated on the
same capped sets (:func:`taskmoe.eval.cohesion.evaluate_row`, each row's report cached in
``OUT/eval/<row>.json``):

- **base**: the backbone; **legal**: + the legal LoRA; **chat SFT** / **chat SFT+DPO**: + the chat LoRA;
- **DOE cohesion**: the upcycled model, experts base / legal / chat, gates per sequence (up to two
  experts, weights p_e / sum p);
- **merged w**: task arithmetic W0 + w (dW_legal + dW_chat);
- **IMoE**: the legal expert drafts, the chat expert answers with the draft in its prompt (rule_qa only;
  legal perplexity is then the legal expert's and the chat measures the chat expert's, as IMoE's
  router sends raw legal text to the legal expert and chat to the chat expert).

Usage::

    python -m bench.cohesion --backbone runs/backbones/smollm2 --out runs/cohesion
    python -m bench.cohesion --quick      # a tiny random backbone, a few steps per stage (smoke test)
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from bench._report import bench_parser, command, md_table, parse_bench_args, write_section
from taskmoe.data.formats import read_alpaca, read_preferences
from taskmoe.data.sft import split_examples
from taskmoe.data.text_windows import TextWindows
from taskmoe.eval.cohesion import EvalData, evaluate_row, imoe_rule_qa
from taskmoe.eval.legal import resolve_legalbench
from taskmoe.io import atomic_write_json, read_json
from taskmoe.layers.lora import load_adapter, set_adapter
from taskmoe.models.backbones import load_backbone
from taskmoe.training.recipes.cohesion import CohesionConfig, cohesion, legal_splits, shared_path


def _tiny_backbone(root: Path) -> tuple[Path, Path]:
    from tests.models.backbones.backbone_helpers import write_hf_backbone

    write_hf_backbone(root / "bb", num_hidden_layers=3)
    cfg = root / "cfg.json"
    CohesionConfig(gate_layer=1, lora_rank=4, lora_alpha=8.0).save(cfg)
    return root / "bb", cfg


def eval_data(cfg: CohesionConfig, args) -> EvalData:
    _, held = legal_splits(cfg)
    _, tok = load_backbone(args.backbone)
    windows = TextWindows(held, tok, cfg.seq_len, full_only=True, max_windows=args.legal_windows)
    _, alpaca = split_examples(read_alpaca(Path(cfg.sft_data)), cfg.sft_val, cfg.sft.seed)
    _, prefs = split_examples(read_preferences(Path(cfg.dpo_data)), cfg.dpo_val, cfg.dpo.seed)
    return EvalData(resolve_legalbench(None if not args.legalbench else Path(args.legalbench)), windows,
                    alpaca[: args.chat_items], prefs[: args.chat_items], hearsay_items=args.hearsay_items,
                    rule_qa_items=args.rule_qa_items, max_len=cfg.seq_len)


def _cached(path: Path, fn) -> dict:
    if path.is_file():
        return read_json(path)
    t0 = time.perf_counter()
    rep = fn()
    rep["seconds"] = time.perf_counter() - t0
    atomic_write_json(path, json.loads(json.dumps(rep, default=float)))
    return rep


def run_rows(out: Path, cfg: CohesionConfig, data: EvalData, backbone: Path) -> dict[str, dict]:
    from taskmoe.doe.upcycle import load_upcycled

    model, tok = load_backbone(backbone)
    adapters = {"legal": out / "legal" / "adapter", "sft": out / "chat_sft" / "adapter",
                "dpo": out / "chat_dpo" / "adapter",
                **{f"merged{i}": out / f"merged_{w:g}" for i, w in enumerate(cfg.merge_weights)}}
    for name, folder in adapters.items():
        load_adapter(model, folder, name=name)
    rows: dict[str, dict] = {}
    plan = [("base", None), ("legal expert", "legal"), ("chat expert (SFT)", "sft"), ("chat expert (SFT+DPO)", "dpo")]
    plan += [(f"merged w={w:g}", f"merged{i}") for i, w in enumerate(cfg.merge_weights)]
    for row, adapter in plan:
        def go(adapter=adapter):
            set_adapter(model, adapter)
            return evaluate_row(model, tok, data)
        rows[row] = _cached(out / "eval" / f"{adapter or 'base'}.json", go)
    rows["IMoE (legal drafts, chat answers)"] = _cached(out / "eval" / "imoe.json", lambda: {"rule_qa": imoe_rule_qa(
        model, tok, data, lambda: set_adapter(model, "legal"), lambda: set_adapter(model, "dpo"))})
    del model
    doe = load_upcycled(out / "doe")

    def go_doe() -> dict:
        rep = evaluate_row(doe, tok, data)
        from taskmoe.eval.legal import read_tsv
        from taskmoe.data.chat import prompt_ids

        qs = read_tsv(data.legalbench / "rule_qa" / "test.tsv", ("text", "answer"))[: data.rule_qa_items]
        with torch.no_grad():
            r = [doe.route(torch.tensor([prompt_ids(tok, [{"role": "user", "content": q["text"].strip()}])]))
                 for q in qs]
        sets = [" + ".join(x.expert_names()[0]) for x in r]
        rep["rule_qa_routing"] = {s: sets.count(s) / len(sets) for s in sorted(set(sets))}
        return rep

    rows["DOE cohesion"] = _cached(out / "eval" / "doe.json", go_doe)
    return rows


def _fmt_ci(h: dict) -> str:
    lo, hi = h["ci95"]
    return f"{h['balanced_accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"


def table(rows: dict[str, dict]) -> str:
    legal, chat = rows["legal expert"], rows["chat expert (SFT+DPO)"]
    out = []
    for name, r in rows.items():
        h = r.get("hearsay")
        src_l = r if "legal" in r else legal
        src_c = r if "alpaca" in r else chat
        note = "" if "legal" in r else " (= legal expert)"
        cnote = "" if "alpaca" in r else " (= chat expert)"
        out.append({
            "row": name,
            "hearsay few-shot raw": _fmt_ci(h["few_shot"]["raw"]) if h else "—",
            "hearsay few-shot calibrated": _fmt_ci(h["few_shot"]["calibrated"]) if h else "—",
            "hearsay zero-shot calibrated": _fmt_ci(h["zero_shot"]["calibrated"]) if h else "—",
            "rule_qa ll/token": f"{r['rule_qa']['mean_ll_per_token']:.3f}",
            "held-out legal ppl": f"{src_l['legal']['ppl']:.2f}{note}",
            "Alpaca ll/token": f"{src_c['alpaca']['mean_ll_per_token']:.3f}{cnote}",
            "hh-rlhf pref. acc.": f"{src_c['preferences']['accuracy']:.3f}{cnote}",
        })
    return md_table(out)


def answers(rows: dict[str, dict]) -> str:
    first = next(iter(rows.values()))["rule_qa"]["answers"]
    lines = []
    for i, a in enumerate(first):
        lines.append(f"**Q{i + 1}.** {a['question']}\n\n*Reference:* {a['reference']}\n")
        for name, r in rows.items():
            ans = r["rule_qa"]["answers"]
            if i < len(ans):
                g = ans[i]["generated"].replace("\n", " ")
                lines.append(f"- *{name}:* {g}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "tiny random backbone and 3 steps per stage (smoke test)", threads=2)
    ap.add_argument("--backbone", type=Path, default=Path("runs/backbones/smollm2"))
    ap.add_argument("--out", type=Path, default=Path("runs/cohesion"))
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--legalbench", default="")
    ap.add_argument("--hearsay-items", type=int, default=None)
    ap.add_argument("--rule-qa-items", type=int, default=None)
    ap.add_argument("--legal-windows", type=int, default=24)
    ap.add_argument("--chat-items", type=int, default=32)
    args = parse_bench_args(ap, argv)
    t0 = time.perf_counter()
    if args.quick:
        root = Path(tempfile.mkdtemp(prefix="bench-cohesion-"))
        args.backbone, args.config = _tiny_backbone(root)
        args.out, args.legal_windows, args.chat_items = root / "run", 4, 4
        args.hearsay_items, args.rule_qa_items = 12, 6
    summary = cohesion(args.backbone, args.out, config=args.config, quick=args.quick, progress=False)
    cfg = CohesionConfig.load(args.out / "cohesion_config.json")
    train_s = time.perf_counter() - t0
    data = eval_data(cfg, args)
    rows = run_rows(args.out, cfg, data, args.backbone)
    total = time.perf_counter() - t0
    doe_rep = read_json(args.out / "doe" / "config.json").get("meta", {})
    body = "\n".join([
        ("**--quick smoke run (tiny random backbone, 3 steps per stage): the numbers mean nothing.**\n"
         if args.quick else ""),
        f"Backbone `{args.backbone}`; budget: legal {cfg.legal.max_steps} steps x {cfg.legal.batch_size} x "
        f"{cfg.seq_len} tokens, SFT {cfg.sft.max_steps} x {cfg.sft.batch_size}, DPO {cfg.dpo.max_steps} x "
        f"{cfg.dpo.batch_size} pairs; LoRA r={cfg.lora_rank} on the MLPs of blocks >= {cfg.gate_layer} (the part "
        f"DOE routes). Eval: hearsay {data.hearsay_items or 'all'} items, rule_qa {data.rule_qa_items or 'all'} "
        f"questions, {len(data.legal_windows)} held-out legal windows of {cfg.seq_len} tokens, "
        f"{len(data.alpaca)} held-out Alpaca examples, {len(data.preferences)} held-out hh-rlhf pairs. "
        f"Wall time {total / 60:.1f} min (training stages + evaluation; cached stages skipped).",
        "",
        table(rows),
        "",
        f"DOE gates (centroid init, then trained): accept rates on gate-training groups "
        f"`{json.dumps(doe_rep.get('accept_rates', {}))}`; on the rule_qa questions (chat form) the experts "
        f"serving each question: `{json.dumps(rows['DOE cohesion'].get('rule_qa_routing', {}))}`.",
        "",
        "### Five rule_qa questions, each row's greedy answer (48 tokens max)",
        "",
        answers(rows),
    ])
    print(body)
    if not args.no_write:
        write_section("cohesion", "Cohesion: legal expert + chat expert (DOE vs merging vs IMoE)",
                      command("cohesion", argv), body)


if __name__ == "__main__":
    main()
