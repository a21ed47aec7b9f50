"""Recipe: add an expert to a trained DOE model (``taskmoe doe add-expert``).

- **setup**: the model folder and its tokenizer; positives are the ``--domain`` documents (or every
  document of ``--source``), negatives as many documents of the default corpus's other domains
  (a deterministic pick, so the gate's BCE is balanced); windows as in :mod:`~taskmoe.training.recipes.doe`.
- **train**: add the expert (optionally initialised from another) and train only it and its gate
  (everything else frozen) on LM loss over its own data + the gate's BCE, with the shared loop
  (:func:`add_expert_loss`). On its positives the new expert is forced on and every incumbent
  forced off, so it serves them alone: forcing only the new column let an accepting incumbent
  outrank it under ``max_experts = 1`` and the new expert got no gradient. On the negatives the new
  expert is forced off and the frozen experts route by threshold, as at inference, so sequences the
  new gate rejects keep bit-identical outputs.
- **cleanup**: save the model folder (with its tokenizer) and report the new gate's accept rates
  on its own and on the other training windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from taskmoe.config import FlagPaths, doc
from taskmoe.data.commands import get_corpus
from taskmoe.doe.model import save_doe
from taskmoe.errors import ConfigError
from taskmoe.training.losses import IGNORE_INDEX, lm_cross_entropy
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train as train_loop
from taskmoe.training.recipes.command import recipe_command
from taskmoe.training.recipes.doe import (
    DEFAULT_OUT, TOKENIZER_FILE, DOEWindowsConfig, load_with_tokenizer, steps_warmup, windows_for)

__all__ = ["DOEAddConfig", "FLAGS", "add_expert", "add_expert_force", "add_expert_loss"]


def add_expert_force(labels: torch.Tensor, j: int, n_experts: int) -> torch.Tensor:
    """(B, E) acceptance override: positives (label 1) -> expert ``j`` only; negatives -> not ``j``, others by threshold."""
    pos = labels.bool().unsqueeze(1)  # (B, 1)
    force = torch.full((labels.shape[0], n_experts), -1, dtype=torch.long, device=labels.device)
    force = torch.where(pos, torch.zeros_like(force), force)
    force[:, j] = labels.long()
    return force


def add_expert_loss(j: int, n_experts: int):
    """LM loss on the positives (served by the new expert ``j`` alone) + the new gate's BCE against the labels."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        lab = batch["label"]
        out_ = model(batch["input_ids"], prompt_mask=batch["prompt_mask"], force=add_expert_force(lab, j, n_experts),
                     capacity=False)
        tgt = batch["targets"].masked_fill(lab.unsqueeze(1) == 0, IGNORE_INDEX)  # LM loss on its data only
        lm = lm_cross_entropy(out_.logits, tgt)
        bce = torch.nn.functional.binary_cross_entropy(out_.routing.scores[:, j].float().clamp(1e-6, 1 - 1e-6),
                                                       lab.float())
        return lm + bce, {"lm": lm.detach(), "gate": bce.detach(), "tokens": int((tgt != IGNORE_INDEX).sum())}

    return loss_fn


@dataclass
class DOEAddConfig(DOEWindowsConfig):
    """``doe add-expert``: the windows and the run that trains the new expert and its gate."""

    train: TrainConfig = doc(TrainConfig(max_steps=200, batch_size=16, lr=2e-3, warmup_steps=10, eval_every=0,
                                         save_every=0, log_every=10, weight_decay=0.1),
                             "the training run (only the new expert and its gate learn)")


FLAGS: dict[str, FlagPaths] = {"seq_len": "seq_len", "prompt_len": "prompt_len", "steps": "train.max_steps",
                               "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
                               "progress": "train.progress"}
"""``doe add-expert`` flag -> the config path it sets (``--steps`` also sets the warm-up to steps // 20)."""


@recipe_command(DOEAddConfig, FLAGS, recipe="doe add-expert", derive=steps_warmup)
def add_expert(model: Path = DEFAULT_OUT / "model", name: str = "new", domain: str = "code", source: Optional[str] = None,
               max_docs_per_domain: Optional[int] = None, init_from: Optional[str] = None, out: Optional[Path] = None,
               progress: bool = True, *, cfg: DOEAddConfig) -> dict[str, Any]:
    """Add an expert to a trained DOE model and train only it and its gate on one domain's data.

    Positives are the --domain documents (or every document of --source); negatives are as many
    documents of the default corpus's other domains. Everything else stays frozen, so sequences the new gate
    rejects keep bit-identical outputs.
    """
    m, tok = load_with_tokenizer(model)
    corpus = get_corpus(None, max_docs_per_domain=max_docs_per_domain, progress=progress)
    domains = list(corpus.domains)
    if source is not None:
        pos_docs = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress).train
        neg_docs = corpus.train
    else:
        if domain not in domains:
            raise ConfigError(f"doe add-expert: domain must be one of {domains}, got {domain!r}")
        pos_docs = [d for d in corpus.train if d.domain == domain]
        neg_docs = [d for d in corpus.train if d.domain != domain]
    # as many negatives as positives (deterministic pick), so the gate's BCE is balanced
    step = max(1, len(neg_docs) // max(1, len(pos_docs)))
    neg_docs = list(neg_docs)[::step][: len(pos_docs)]
    data = windows_for(list(pos_docs) + list(neg_docs), tok, domains, cfg.seq_len, cfg.prompt_len,
                       [1] * len(pos_docs) + [0] * len(neg_docs))
    torch.manual_seed(cfg.train.seed)
    m.add_expert(name, init_from=init_from)
    m.freeze_except(name)
    j = m.expert_names.index(name)
    loss_fn = add_expert_loss(j, len(m.expert_names))

    dest = Path(out) if out is not None else Path(model)
    res = train_loop(m, loss_fn, data, cfg.train,
                     out_dir=dest.parent / f"{dest.name}.train_add_{name}", resume=True)
    for p in m.parameters():
        p.requires_grad_(True)
    m.eval()
    with torch.no_grad():
        acc = []
        for i in range(0, len(data), 64):
            b = [data[k] for k in range(i, min(len(data), i + 64))]
            r = m.route(torch.stack([x["input_ids"] for x in b]), torch.stack([x["prompt_mask"] for x in b]))
            acc += r.accepted[:, j].tolist()
    labels = data.labels.tolist()
    tp = sum(a and lab == 1 for a, lab in zip(acc, labels))
    fp = sum(a and lab == 0 for a, lab in zip(acc, labels))
    folder = save_doe(m, dest, extra_files={TOKENIZER_FILE: lambda p: p.write_text(tok.to_str(), encoding="utf-8")})
    return {"model": str(folder), "expert": name, "steps": res.steps, "experts": list(m.expert_names),
            "accept_rate_own_train": tp / max(1, labels.count(1)), "accept_rate_other_train": fp / max(1, labels.count(0))}
