"""Recipe: cohesion (``taskmoe cohesion --backbone DIR``) — a legal expert from raw law and a chat expert from
SFT + DPO, joined as experts of one upcycled DOE model, plus the same two experts merged (task arithmetic).

Stages (each writes its folder under ``OUT`` and is skipped when that folder is complete, so a rerun
resumes; the trainers inside resume from their own checkpoints too):

1. ``legal/``    — LoRA continued pretraining of the backbone on raw legal text (the legal corpus
   source, :class:`~taskmoe.data.legal.LegalFolder`; next-token loss on every token,
   :class:`~taskmoe.data.text_windows.TextWindows`). The corpus's validation split is held out.
2. ``chat_sft/`` — LoRA SFT on Alpaca data (:func:`~taskmoe.training.recipes.sft.sft_loss`; the first
   ``sft_val`` examples of the trainer's seeded permutation are held out).
3. ``chat_dpo/`` — DPO continuing that adapter on hh-rlhf pairs (reference: the SFT adapter frozen;
   the first ``dpo_val`` pairs held out).
4. ``doe/``      — :mod:`taskmoe.doe.upcycle`: the backbone with experts ``base`` (its MLPs), ``legal`` and
   ``chat`` (LoRA experts holding the two adapters); gates from domain centroids, then trained on
   pooled features of raw legal text (targets legal 1, chat 0), Alpaca prompts (0, 1) and legal
   passages put in a user turn (1, 1: chat-formed legal text wants both experts). No legal Q&A data.
5. ``merged_<w>/`` — task arithmetic ``W = W0 + w (dW_legal + dW_chat)`` for each mixing weight ``w``,
   stored exactly as one LoRA adapter of rank ``r_legal + r_chat`` (A stacked, B scaled by ``w``).

Every adapter targets only the MLP projections of blocks ``>= gate_layer``: that is the part DOE
routes, so each expert inside the DOE model computes exactly what its adapter does on the backbone.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from taskmoe.config import Config, apply_overrides, check, doc, load_config
from taskmoe.data.commands import get_corpus
from taskmoe.data.formats import read_alpaca, read_preferences
from taskmoe.data.sft import PreferenceDataset, SFTDataset, split_examples
from taskmoe.data.text_windows import TextWindows
from taskmoe.errors import ConfigError
from taskmoe.io import CONFIG_FILE, atomic_write_json, load_component, save_component
from taskmoe.layers.lora import ADAPTER_KIND
from taskmoe.progress import progress_bar
from taskmoe.training.config import TrainConfig
from taskmoe.training.recipes.chat import ChatRecipeConfig, cleanup as chat_cleanup, run as chat_run, setup as chat_setup
from taskmoe.training.recipes.dpo import DPOConfig, dpo_loss_fn
from taskmoe.training.recipes.sft import SFTConfig, sft_loss

__all__ = ["CohesionConfig", "mlp_targets", "stage_done", "train_legal", "train_chat", "build_doe_stage",
           "task_arithmetic", "quick_config", "build_config", "setup", "train", "cleanup", "cohesion", "shared_path"]

DEFAULT_OUT = Path("runs/cohesion")


def shared_path(*parts: str) -> str:
    """``$TASKMOE_SHARED/...`` when set, else ``../shared/...`` (the read-only shared data folder)."""
    import os

    root = Path(os.environ["TASKMOE_SHARED"]) if os.environ.get("TASKMOE_SHARED") else Path("..") / "shared"
    return str(root.joinpath(*parts))


def _train(steps: int, bs: int, lr: float) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=bs, lr=lr, warmup_steps=max(1, steps // 10), eval_every=0,
                       save_every=max(10, steps // 4), log_every=5, weight_decay=0.0)


@dataclass
class CohesionConfig(Config):
    """Data, adapters and the three training runs of ``taskmoe cohesion``."""

    legal_source: str = doc(shared_path("data", "legal_raw"), "folder of raw law (the legal corpus source)")
    sft_data: str = doc(shared_path("data", "sft", "alpaca_5000.json"), "Alpaca JSON for the chat expert's SFT")
    dpo_data: str = doc(shared_path("data", "dpo", "hh_rlhf_harmless_base_test.jsonl.gz"), "hh-rlhf pairs for DPO")
    gate_layer: int = doc(6, "blocks before it stay dense; the adapters and experts cover blocks >= gate_layer")
    lora_rank: int = doc(16, "LoRA rank of both experts")
    lora_alpha: float = doc(32.0, "LoRA alpha of both experts")
    seq_len: int = doc(256, "tokens per legal window and per chat example")
    sft_val: int = doc(64, "Alpaca examples held out (the first of the seeded permutation)")
    dpo_val: int = doc(64, "preference pairs held out")
    max_sft_examples: Optional[int] = doc(2000, "Alpaca examples used for SFT at most")
    max_dpo_examples: Optional[int] = doc(1000, "pairs used for DPO at most")
    beta: float = doc(0.1, "DPO beta")
    gate_examples: int = doc(48, "sequences per gate-training group (legal text, Alpaca prompts, legal in chat form)")
    gate_tokens: int = doc(128, "tokens of each gate-training sequence")
    merge_weights: list[float] = doc([0.5, 1.0], "task-arithmetic mixing weights w in W0 + w (dW_legal + dW_chat)")
    legal: TrainConfig = field(default_factory=lambda: _train(80, 4, 1e-3), metadata={"help": "legal pretraining run"})
    sft: TrainConfig = field(default_factory=lambda: _train(60, 4, 1e-3), metadata={"help": "chat SFT run"})
    dpo: TrainConfig = field(default_factory=lambda: _train(30, 2, 5e-4), metadata={"help": "chat DPO run"})

    def validate(self) -> None:
        check(self.gate_layer >= 0 and self.lora_rank >= 1 and self.seq_len >= 16,
              f"CohesionConfig: gate_layer >= 0, lora_rank >= 1, seq_len >= 16 needed "
              f"(got {self.gate_layer}, {self.lora_rank}, {self.seq_len})")
        check(all(w > 0 for w in self.merge_weights), f"merge_weights must be > 0, got {self.merge_weights}")


def mlp_targets(gate_layer: int, n_layers: int) -> list[str]:
    """The LoRA target regex: MLP projections of blocks ``gate_layer .. n_layers - 1``."""
    layers = "|".join(str(i) for i in range(gate_layer, n_layers))
    return [rf"blocks\.(?:{layers})\.mlp\.(?:gate|up|down)_proj"]


def stage_done(folder: Path) -> bool:
    """A stage's output folder is complete (its config.json was written last, atomically)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def _chat_cfg(cls: type, cfg: CohesionConfig, n_layers: int, train: TrainConfig, val: int, limit: Optional[int],
              name: str, **kw: Any) -> Any:
    return cls(max_len=cfg.seq_len, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
               lora_targets=mlp_targets(cfg.gate_layer, n_layers), adapter_name=name, val_examples=val,
               max_examples=limit, train=train, **kw)


def legal_splits(cfg: CohesionConfig, progress: bool = False) -> tuple[list[Any], list[Any]]:
    """(train, held-out) legal documents: the legal corpus's train and validation splits (parsed once per process)."""
    return _legal_splits(cfg.legal_source, progress)


@functools.lru_cache(maxsize=4)
def _legal_splits(source: str, progress: bool) -> tuple[list[Any], list[Any]]:
    corpus = get_corpus(f"legal:{source}", progress=progress)
    return list(corpus.train), list(corpus.validation)


def train_legal(backbone: Path, cfg: CohesionConfig, out: Path, n_layers: int, progress: bool) -> dict[str, Any]:
    """Stage 1: the legal LoRA expert by next-token loss on raw legal text."""
    train_docs, _ = legal_splits(cfg, progress)
    ccfg = _chat_cfg(ChatRecipeConfig, cfg, n_layers, cfg.legal.replace(progress=progress), 0, None, "legal")
    st = chat_setup(backbone, train_docs, TextWindows, ccfg)
    return chat_cleanup(st, chat_run(st, sft_loss, ccfg, out), ccfg, out, "legal_pretrain")


def train_chat(backbone: Path, cfg: CohesionConfig, sft_out: Path, dpo_out: Path, n_layers: int,
               progress: bool) -> dict[str, Any]:
    """Stages 2-3: the chat LoRA expert, SFT then DPO continuing the SFT adapter (each skipped when done)."""
    out: dict[str, Any] = {}
    if not stage_done(sft_out / "adapter"):
        scfg = _chat_cfg(SFTConfig, cfg, n_layers, cfg.sft.replace(progress=progress), cfg.sft_val,
                         cfg.max_sft_examples, "chat")
        st = chat_setup(backbone, read_alpaca(Path(cfg.sft_data)), SFTDataset, scfg)
        out["sft"] = chat_cleanup(st, chat_run(st, sft_loss, scfg, sft_out), scfg, sft_out, "sft")
    if not stage_done(dpo_out / "adapter"):
        dcfg = _chat_cfg(DPOConfig, cfg, n_layers, cfg.dpo.replace(progress=progress), cfg.dpo_val,
                         cfg.max_dpo_examples, "chat", beta=cfg.beta)
        st = chat_setup(backbone, read_preferences(Path(cfg.dpo_data)), PreferenceDataset, dcfg,
                        start=sft_out / "adapter")
        out["dpo"] = chat_cleanup(st, chat_run(st, dpo_loss_fn(st.policy, dcfg.beta), dcfg, dpo_out), dcfg, dpo_out,
                                  "dpo")
    return out


def gate_sequences(tok: Any, cfg: CohesionConfig) -> dict[str, list[list[int]]]:
    """Token sequences of the three gate-training groups (module docstring, stage 4)."""
    from taskmoe.data.chat import prompt_ids

    train_docs, _ = legal_splits(cfg)
    n, t = cfg.gate_examples, cfg.gate_tokens
    step = max(1, len(train_docs) // (2 * n))
    docs = train_docs[::step][: 2 * n]
    raw = [tok.encode(d.text, allow_special=False)[:t] for d in docs[:n]]
    in_chat = [prompt_ids(tok, [{"role": "user", "content": tok.decode(tok.encode(d.text, allow_special=False)[:t])}])
               for d in docs[n : 2 * n]]
    sft_train, _ = split_examples(read_alpaca(Path(cfg.sft_data)), cfg.sft_val, cfg.sft.seed)
    chat = [prompt_ids(tok, [dict(m) for m in ex.messages])[:t] for ex in sft_train[:n]]
    return {"legal_text": raw, "chat_prompts": chat, "legal_in_chat": in_chat}


def build_doe_stage(backbone: Path, cfg: CohesionConfig, out: Path, legal_adapter: Path, chat_adapter: Path) -> dict[str, Any]:
    """Stage 4: upcycle, fill the experts from the adapters, centroid-initialise and train the gates, save."""
    from taskmoe.doe.upcycle import (add_backbone_expert, centroid_gates, expert_from_adapter, gate_features,
                                     save_upcycled, train_gates, upcycle_config, upcycle_model)
    from taskmoe.models.backbones import load_backbone, read_backbone_config

    lm, tok = load_backbone(backbone)
    model = upcycle_model(lm, upcycle_config(backbone, read_backbone_config(backbone), gate_layer=cfg.gate_layer,
                                             max_experts=2, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha))
    for name, folder in (("legal", legal_adapter), ("chat", chat_adapter)):
        add_backbone_expert(model, name, "lora")
        expert_from_adapter(model, name, folder)
    model.eval()
    seqs = gate_sequences(tok, cfg)
    feats = {k: gate_features(model, v) for k, v in seqs.items()}
    margins = centroid_gates(model, {"legal": feats["legal_text"], "chat": feats["chat_prompts"]})
    x = torch.cat([feats["legal_text"], feats["chat_prompts"], feats["legal_in_chat"]])
    y = torch.tensor([[1, 0]] * len(feats["legal_text"]) + [[0, 1]] * len(feats["chat_prompts"])
                     + [[1, 1]] * len(feats["legal_in_chat"]))
    losses = train_gates(model, x, y, ["legal", "chat"], steps=300)
    with torch.no_grad():  # share of each group's sequences every expert accepts (threshold routing)
        accept = {k: model.gate(torch.cat([model.pooled(torch.tensor([q])) for q in v]), capacity=False)
                  .accepted.float().mean(0).tolist() for k, v in seqs.items()}
    report = {"centroid_margins": margins, "gate_loss_first": losses[0], "gate_loss_last": losses[-1],
              "accept_rates": {k: dict(zip(model.expert_names, v)) for k, v in accept.items()}}
    save_upcycled(model, out, meta=report)
    return report


def task_arithmetic(adapters: list[Path], weights: list[float], out: Path, *, name: str = "merged") -> Path:
    """One LoRA adapter whose update is ``sum_i w_i dW_i`` of the given adapters, exactly (stacked ranks).

    With ``dW_i = s_i B_i A_i``: ``A = [A_1; A_2; ...]`` (sum r_i, in), ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]``
    (out, sum r_i), stored with ``alpha = r`` (scale 1). Every adapter must cover the same modules.
    """
    comps = [load_component(a, ADAPTER_KIND) for a in adapters]
    mods = [c.config["modules"] for c in comps]
    if any(set(m) != set(mods[0]) for m in mods):
        raise ConfigError(f"task_arithmetic: adapters {[str(a) for a in adapters]} cover different modules")
    ts = [c.tensors() for c in comps]
    tensors, modules = {}, {}
    for m, mc in mods[0].items():
        A = torch.cat([t[f"{m}.lora_A"] for t in ts])
        B = torch.cat([t[f"{m}.lora_B"] * (w * md[m]["alpha"] / md[m]["rank"]) for t, w, md in zip(ts, weights, mods)], 1)
        tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"] = A.contiguous(), B.contiguous()
        modules[m] = {"rank": int(A.shape[0]), "alpha": float(A.shape[0]), "dropout": 0.0, "in": mc["in"], "out": mc["out"]}
    meta = {"task_arithmetic": {"adapters": [str(a) for a in adapters], "weights": list(weights)},
            "base_model": comps[0].meta.get("base_model")}
    return save_component(out, ADAPTER_KIND, {"name": name, "modules": modules}, tensors, meta=meta)


# ------------------------------------------------------------------- setup / train / cleanup
@dataclass
class CohesionSetup:
    backbone: Path
    out: Path
    n_layers: int


def quick_config(cfg: CohesionConfig) -> CohesionConfig:
    """A few steps per stage and small data (``--quick``, a smoke test)."""
    q = lambda t: t.replace(max_steps=3, save_every=3, warmup_steps=1)  # noqa: E731
    return cfg.replace(legal=q(cfg.legal), sft=q(cfg.sft), dpo=q(cfg.dpo), gate_examples=8, max_sft_examples=64,
                       max_dpo_examples=32, seq_len=min(cfg.seq_len, 128))


def build_config(config: Optional[Path] = None, overrides: Optional[list[str]] = None, quick: bool = False) -> CohesionConfig:
    """The JSON file (or defaults), then ``--quick``, then the ``--set PATH=VALUE`` overrides (which win)."""
    cfg = load_config(CohesionConfig, config)
    return apply_overrides(quick_config(cfg) if quick else cfg, overrides or ())


def setup(backbone: Path, cfg: CohesionConfig, out: Path) -> CohesionSetup:
    """Check the gate layer against the backbone, create OUT and record the config there."""
    from taskmoe.models.backbones import read_backbone_config

    n_layers = read_backbone_config(backbone).num_hidden_layers
    if cfg.gate_layer >= n_layers:
        raise ConfigError(f"cohesion: gate_layer {cfg.gate_layer} must be < the backbone's {n_layers} layers")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "cohesion_config.json")
    return CohesionSetup(Path(backbone), out, n_layers)


def train(st: CohesionSetup, cfg: CohesionConfig, progress: bool = True) -> dict[str, Any]:
    """The four stages in order, each skipped when its folder is complete (module docstring)."""
    backbone, out, n_layers = st.backbone, st.out, st.n_layers
    summary: dict[str, Any] = {"out": str(out)}
    with progress_bar(progress) as bar:
        task = bar.add_task("cohesion stages", total=4)
        if not stage_done(out / "legal" / "adapter"):
            summary["legal"] = train_legal(backbone, cfg, out / "legal", n_layers, progress)
        bar.advance(task)
        summary.update(train_chat(backbone, cfg, out / "chat_sft", out / "chat_dpo", n_layers, progress))
        bar.advance(task)
        if not stage_done(out / "doe"):
            summary["doe"] = build_doe_stage(backbone, cfg, out / "doe", out / "legal" / "adapter",
                                             out / "chat_dpo" / "adapter")
        bar.advance(task)
        for w in cfg.merge_weights:
            dest = out / f"merged_{w:g}"
            if not stage_done(dest):
                task_arithmetic([out / "legal" / "adapter", out / "chat_dpo" / "adapter"], [w, w], dest)
        bar.advance(task)
    return summary


def cleanup(st: CohesionSetup, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``OUT/reports/cohesion.json`` (the stages' summaries) and return it."""
    atomic_write_json(st.out / "reports" / "cohesion.json", json.loads(json.dumps(summary, default=str)))
    return summary


# ------------------------------------------------------------------------------------ CLI
def cohesion(
    backbone: Annotated[Path, typer.Option(help="the backbone folder (taskmoe backbone import)")],
    out: Path = DEFAULT_OUT,
    config: Optional[Path] = None,
    set: Optional[list[str]] = None,
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Legal expert (raw law) + chat expert (SFT then DPO) as experts of one upcycled DOE model: taskmoe cohesion.

    Stages, each skipped when its folder under OUT is complete (a rerun resumes): legal/ (LoRA continued
    pretraining on the legal corpus), chat_sft/ and chat_dpo/ (LoRA SFT on Alpaca, then DPO on hh-rlhf),
    doe/ (the backbone upcycled with experts base, legal, chat; gates from domain centroids, then trained),
    merged_<w>/ (task arithmetic of the two adapters). --config reads a CohesionConfig JSON; --quick runs
    a few steps per stage (a smoke test); --set PATH=VALUE (repeatable, e.g. --set sft.lr=5e-4) overrides
    any field last. `python -m bench.cohesion` evaluates every row.
    """
    cfg = build_config(config, set, quick)
    st = setup(backbone, cfg, out)
    return cleanup(st, train(st, cfg, progress))
