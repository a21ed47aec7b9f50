"""Recipe: supervised fine-tuning on chat data (``taskmoe train sft``), loss on assistant tokens only.

Thin over :mod:`taskmoe.training.recipes.chat` (setup / train / cleanup) with:

- data: Alpaca JSON or JSON Lines (:func:`taskmoe.data.formats.read_alpaca`) rendered by
  :class:`taskmoe.data.sft.SFTDataset` with the tokenizer's chat template; labels are -100
  everywhere except on assistant tokens (content + end-of-turn);
- loss: :func:`sft_loss`, the token mean of the cross-entropy over those labels
  (:func:`~taskmoe.training.losses.lm_cross_entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskmoe.data.formats import read_alpaca
from taskmoe.data.sft import SFTDataset
from taskmoe.training.losses import IGNORE_INDEX, lm_cross_entropy
from taskmoe.training.policy import logits_of
from taskmoe.training.recipes.chat import FLAGS, ChatRecipeConfig, cleanup, run as train, setup
from taskmoe.training.recipes.command import recipe_command

__all__ = ["SFTConfig", "sft_loss", "setup", "train", "cleanup", "train_sft"]

DEFAULT_OUT = Path("runs/sft")


@dataclass
class SFTConfig(ChatRecipeConfig):
    """SFT: the shared chat recipe settings (no extra knobs)."""


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """``L = -(1/N) sum_{t: y_t != -100} log p(y_t | y_<t)`` over the assistant tokens of the batch."""
    logits = logits_of(model(batch["input_ids"]))  # (B, T, V)
    loss = lm_cross_entropy(logits, batch["labels"])
    return loss, {"tokens": int((batch["labels"] != IGNORE_INDEX).sum())}


@recipe_command(SFTConfig, FLAGS, recipe="train sft")
def train_sft(model: Path, data: Path, out: Path = DEFAULT_OUT, *, cfg: SFTConfig) -> dict[str, Any]:
    """Supervised fine-tuning of MODEL on Alpaca-style DATA (JSON or JSONL), loss on assistant tokens only.

    MODEL is a model folder (config.json + model.safetensors, tokenizer.json in or beside it).
    Trains a LoRA adapter (--lora-rank R, default 8) or every weight (--lora-rank 0) with the
    chat template of the model's tokenizer, in length-grouped batches. Writes OUT/adapter/ (or
    OUT/model/), OUT/tokenizer.json and OUT/reports/metrics.json; checkpoints in OUT/train (a
    rerun resumes). --config reads an SFTConfig JSON; the flags given override it, and --set PATH=VALUE
    (repeatable, e.g. --set train.warmup_steps=5 --set lora_alpha=32) overrides any field last.
    """
    st = setup(model, read_alpaca(data), SFTDataset, cfg)
    res = train(st, sft_loss, cfg, out)
    return cleanup(st, res, cfg, out, "sft")
