"""Shared setup / train / cleanup of the chat recipes (``taskmoe train sft``, ``taskmoe train dpo``).

The two recipes differ only in their data reader, dataset and loss (:mod:`.sft`, :mod:`.dpo`);
everything else is here, once:

- **setup** (:func:`setup`): load the model folder (any :func:`~taskmoe.models.checkpoint.save_lm`
  folder: ``transformer_lm`` / ``expert_lm`` / ``summarizer_lm``, with the tokenizer saved in or
  beside it; or a backbone folder of ``taskmoe backbone import``, which is our own ``CausalLM`` with
  the backbone's tokenizer and Jinja chat template); build the :class:`~taskmoe.training.policy.Policy` (LoRA with ``lora_rank > 0``, else full
  fine-tuning); split the examples by a seeded permutation into ``val_examples`` held-out and the
  rest; wrap both in length-grouped batches (:class:`~taskmoe.data.sft.GroupedBatches`).
- **train** (:func:`run`): the one loop (:func:`taskmoe.training.loop.train`) with the loop's
  ``batch_size = 1`` because every item already is a batch of ``train.batch_size`` examples;
  checkpoints in ``OUT/train`` (a rerun resumes exactly).
- **cleanup** (:func:`cleanup`): the main process writes ``OUT/adapter/`` (LoRA) or ``OUT/model/``
  (full), ``OUT/tokenizer.json`` and ``OUT/reports/metrics.json``.

Data preparation stays in :mod:`taskmoe.data` (reading, templating, masking, truncation,
grouping); nothing here touches tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from taskmoe.config import Config, FlagPaths, check, check_min, doc
from taskmoe.data.sft import GroupedBatches, split_examples
from taskmoe.data.tokenizer import TOKENIZER_FILE
from taskmoe.errors import ConfigError
from taskmoe.io import atomic_write_json, atomic_write_text
from taskmoe.models.checkpoint import save_lm
from taskmoe.models.folder import is_backbone, load_model_folder
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import TrainResult, make_accelerator, train
from taskmoe.training.policy import Policy, full_policy, lora_policy

# our builders' linear layers (qkv, in_proj, proj, out_proj, gate_up, down) and a backbone's ({q,k,v,o,gate,up,down}_proj)
DEFAULT_TARGETS = ["qkv|in_proj|proj|out_proj|gate_up|down|[qkvo]_proj|gate_proj|up_proj|down_proj"]


def _train_default() -> TrainConfig:
    return TrainConfig(max_steps=200, batch_size=8, lr=5e-4, warmup_steps=10, eval_every=50, save_every=50,
                       eval_batches=4, log_every=5)


@dataclass
class ChatRecipeConfig(Config):
    """What SFT and DPO share: sequence length, adapter, held-out split and the training run."""

    max_len: int = doc(512, "tokens per sequence (prompt + answer), truncated by data.sft.truncate_masked")
    lora_rank: int = doc(8, "LoRA rank r of the trained adapter; 0 fine-tunes every parameter")
    lora_alpha: float = doc(16.0, "LoRA alpha (scale s = alpha / r)")
    lora_dropout: float = doc(0.0, "dropout on the adapter's input")
    lora_targets: list[str] = doc(list(DEFAULT_TARGETS), "regexes of the linear layers to adapt (layers.lora.inject)")
    adapter_name: str = doc("chat", "name of the trained adapter")
    val_examples: int = doc(64, "examples held out for evaluation (seeded permutation)")
    max_examples: Optional[int] = doc(None, "use at most this many examples (after the permutation)")
    mega: int = doc(16, "length grouping: sort mega x batch_size examples at a time")
    train: TrainConfig = field(default_factory=_train_default, metadata={"help": "the training run"})

    def validate(self) -> None:
        check_min(self, ("max_len",), 2)
        check(self.lora_rank >= 0, f"lora_rank must be >= 0 (0 = full fine-tune), got {self.lora_rank}")
        check_min(self, ("val_examples",))
        check(self.max_examples is None or self.max_examples >= 1, f"max_examples must be >= 1, got {self.max_examples}")
        check_min(self, ("mega",), 1)


FLAGS: dict[str, FlagPaths] = {
    "lora_rank": "lora_rank", "max_len": "max_len", "max_examples": "max_examples", "val_examples": "val_examples",
    "steps": "train.max_steps", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "lr": "train.lr",
    "seed": "train.seed", "progress": "train.progress",
}
"""``train sft`` / ``train dpo`` flag -> the config path it sets (DPO adds ``beta``, ``label_smoothing``)."""


@dataclass
class ChatSetup:
    policy: Policy
    tokenizer: Any  # our Tokenizer or a BackboneTokenizer
    train: GroupedBatches
    val: GroupedBatches | None
    counts: dict[str, int]
    model_dir: Path


def build_policy(model: nn.Module, cfg: ChatRecipeConfig, model_dir: Path, start: Optional[Path]) -> Policy:
    """LoRA (fresh, or continued from ``start``) when ``lora_rank > 0``, else full fine-tuning."""
    torch.manual_seed(cfg.train.seed)  # adapter init is part of the run's identity (exact resume)
    if cfg.lora_rank > 0 or start is not None:
        return lora_policy(model, targets=cfg.lora_targets, rank=max(1, cfg.lora_rank), alpha=cfg.lora_alpha,
                           dropout=cfg.lora_dropout, name=cfg.adapter_name, start=start,
                           meta={"base_model": str(model_dir)})
    return full_policy(model, lambda folder: save_lm(model, folder, kind="lm", meta={"fine_tuned_from": str(model_dir)}))


def setup(model_dir: Path, examples: Sequence[Any], make_dataset: Callable[[Sequence[Any], Any, int], Any],
          cfg: ChatRecipeConfig, *, start: Optional[Path] = None) -> ChatSetup:
    """Model + tokenizer + policy + grouped train/val batches (module docstring)."""
    model_dir = Path(model_dir)
    if is_backbone(model_dir) and cfg.lora_rank == 0 and start is None:
        raise ConfigError(f"{model_dir}: full fine-tuning of a backbone is not supported; train a LoRA adapter "
                          "(--lora-rank R > 0)")
    model, tok = load_model_folder(model_dir)
    model.train()
    policy = build_policy(model, cfg, model_dir, start)
    train_ex, val_ex = split_examples(examples, cfg.val_examples, cfg.train.seed, cfg.max_examples)
    bs, seed = cfg.train.batch_size, cfg.train.seed
    train_ds = GroupedBatches(make_dataset(train_ex, tok, cfg.max_len), bs, seed, cfg.mega)
    val_ds = GroupedBatches(make_dataset(val_ex, tok, cfg.max_len), bs, seed, cfg.mega) if val_ex else None
    counts = {"train_examples": len(train_ex), "val_examples": len(val_ex), "train_batches": len(train_ds),
              "trainable_params": policy.trainable_parameters()}
    return ChatSetup(policy, tok, train_ds, val_ds, counts, model_dir)


def run(st: ChatSetup, loss_fn: Callable, cfg: ChatRecipeConfig, out: Path, *, callbacks: Sequence[Any] = (),
        accelerator: Any = None) -> TrainResult:
    """The one loop over grouped batches (loop batch_size 1), checkpoints in ``out/train``."""
    loop_cfg = cfg.train.replace(batch_size=1)
    return train(st.policy.model, loss_fn, st.train, loop_cfg, eval_data=st.val, out_dir=Path(out) / "train",
                 resume=True, callbacks=list(callbacks), accelerator=accelerator)


def cleanup(st: ChatSetup, res: TrainResult, cfg: ChatRecipeConfig, out: Path, recipe: str,
            accelerator: Any = None) -> dict[str, Any]:
    """Save the trained part, the tokenizer and the metrics (main process); return the summary."""
    out = Path(out)
    acc = accelerator or make_accelerator(cfg.train)
    folder = out / ("adapter" if st.policy.kind == "lora" else "model")
    summary: dict[str, Any] = {"recipe": recipe, "policy": st.policy.kind, "base_model": str(st.model_dir),
                               "steps": res.steps, **st.counts,
                               "first_loss": res.losses[0] if res.losses else None,
                               "last_loss": res.losses[-1] if res.losses else None,
                               "tokens_per_s": res.tokens_per_s, **(res.eval_history[-1] if res.eval_history else {}),
                               "output": str(folder), "config": cfg.to_dict()}
    if acc.is_main_process:
        st.policy.save(folder)
        atomic_write_text(out / TOKENIZER_FILE, st.tokenizer.to_str())
        atomic_write_json(out / "reports" / "metrics.json", summary)
    return summary

