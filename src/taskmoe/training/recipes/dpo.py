"""Recipe: Direct Preference Optimisation on preference pairs (``taskmoe train dpo``).

Thin over :mod:`taskmoe.training.recipes.chat` (setup / train / cleanup) with:

- data: HH-RLHF ``{chosen, rejected}`` JSONL(.gz) or AlpacaEval annotations
  (:func:`taskmoe.data.formats.read_preferences`) rendered by
  :class:`taskmoe.data.sft.PreferenceDataset` (prompt + one final assistant turn per side);
- reference: the policy's frozen reference (:mod:`taskmoe.training.policy`): for a LoRA
  adapter the same model with the adapter off, or, when continuing an SFT adapter
  (``--adapter``), a frozen copy of that adapter's A/B only; for full fine-tuning a frozen copy;
- loss: :func:`dpo_loss_fn` = :func:`~taskmoe.training.losses.dpo_loss` on the completions'
  summed log-probabilities, with ``beta`` and optional label smoothing; metrics: implicit
  rewards of both sides, their margin and the share of pairs ranked right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from taskmoe.config import FlagPaths, check, doc
from taskmoe.data.formats import read_preferences
from taskmoe.data.sft import PreferenceDataset
from taskmoe.training.losses import IGNORE_INDEX, completion_logprob, dpo_loss, dpo_metrics
from taskmoe.training.policy import Policy, logits_of
from taskmoe.training.recipes.chat import FLAGS as CHAT_FLAGS, ChatRecipeConfig, cleanup, run as train, setup
from taskmoe.training.recipes.command import recipe_command

__all__ = ["DPOConfig", "dpo_loss_fn", "setup", "train", "cleanup", "train_dpo", "FLAGS"]

DEFAULT_OUT = Path("runs/dpo")
FLAGS: dict[str, FlagPaths] = {**CHAT_FLAGS, "beta": "beta", "label_smoothing": "label_smoothing"}
"""``train dpo`` flag -> the config path it sets."""


@dataclass
class DPOConfig(ChatRecipeConfig):
    """DPO: the shared chat recipe settings plus the KL temperature and label smoothing."""

    beta: float = doc(0.1, "beta: strength of the implicit KL to the reference (Rafailov et al. 2023)")
    label_smoothing: float = doc(0.0, "eps in [0, 0.5): conservative DPO for noisy labels (0 = plain DPO)")

    def validate(self) -> None:
        super().validate()
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(0.0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def dpo_loss_fn(policy: Policy, beta: float, label_smoothing: float = 0.0
                ) -> Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]:
    """Loss on a preference batch: chosen and rejected stacked into one (2B, T) forward of each model."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
        pi_w, pi_l = completion_logprob(logits_of(model(ids)), labels).chunk(2)  # (B,), (B,)
        with torch.no_grad():
            ref_w, ref_l = completion_logprob(policy.reference_logits(ids), labels).chunk(2)
        out = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing)
        return out.loss, {**dpo_metrics(out), "logps_chosen": pi_w.detach().mean(),
                          "logps_rejected": pi_l.detach().mean(), "tokens": int((labels != IGNORE_INDEX).sum())}

    return loss_fn


@recipe_command(DPOConfig, FLAGS, recipe="train dpo")
def train_dpo(model: Path, data: Path, out: Path = DEFAULT_OUT, adapter: Optional[Path] = None, *,
              cfg: DPOConfig) -> dict[str, Any]:
    """DPO of MODEL on preference pairs DATA (HH-RLHF JSONL(.gz) or AlpacaEval JSON), with a frozen reference.

    Trains a fresh LoRA adapter (reference: the same model with it off), continues an SFT adapter
    (--adapter DIR, e.g. OUT/adapter of `train sft`; reference: that adapter frozen), or every
    weight (--lora-rank 0; reference: a frozen copy). Metrics: loss, rewards of chosen and
    rejected, reward margin and accuracy. Writes OUT/adapter/ (or OUT/model/),
    OUT/tokenizer.json, OUT/reports/metrics.json; checkpoints in OUT/train (a rerun resumes).
    --config reads a DPOConfig JSON; the flags given override it, and --set PATH=VALUE (repeatable)
    overrides any field last.
    """
    st = setup(model, read_preferences(data), PreferenceDataset, cfg, start=adapter)
    res = train(st, dpo_loss_fn(st.policy, cfg.beta, cfg.label_smoothing), cfg, out)
    return cleanup(st, res, cfg, out, "dpo")
