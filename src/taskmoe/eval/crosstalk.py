"""Cross-talk evaluation: rollouts before/after training, the discriminator's detection rate, the
perplexity of cross-talk text under the base experts, a fresh-discriminator probe, and the curves.

Used by the cross-talk recipe (:mod:`taskmoe.training.recipes.crosstalk`, which re-exports these
names) and its benchmark. Perplexities are token NLL (:mod:`taskmoe.eval.nll`) over exactly the
positions after the opening: the cross-talk part of the interrupted texts, or the same positions
of the uninterrupted ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from taskmoe.crosstalk.dialogue import Transcript, token_scores
from taskmoe.crosstalk.discriminator import Discriminator, DiscriminatorConfig, pad_batch
from taskmoe.crosstalk.gan import CrosstalkGAN, Rollout, discriminator_loss
from taskmoe.errors import DataError
from taskmoe.eval.nll import NLL
from taskmoe.io import atomic_write

__all__ = ["collect_rollouts", "detection", "rollout_perplexity", "compare_rollouts", "probe_accuracy", "plot_curves"]


@torch.no_grad()
def collect_rollouts(gan: CrosstalkGAN, data: Any, batch_size: int, seed: int = 0) -> list[Rollout]:
    """Rollouts of every prompt of ``data`` (with ``data.batches(batch_size)``, e.g. ``CrosstalkPrompts``) in order, batch ``i`` drawn with generator seed ``seed + i``."""
    was = gan.training
    gan.eval()
    try:
        return [gan.rollout(batch, torch.Generator().manual_seed(seed + i)) for i, batch in enumerate(data.batches(batch_size))]
    finally:
        gan.train(was)


@torch.no_grad()
def detection(discriminator: Discriminator, rollouts: Sequence[Rollout]) -> dict[str, float]:
    """The discriminator's accuracy on the uninterrupted and interrupted texts of ``rollouts``."""
    was = discriminator.training
    discriminator.eval()
    try:
        real = [t.ids for r in rollouts for t in r.real]
        fake = [t.ids for r in rollouts for t in r.fake]
        dev = next(discriminator.parameters()).device
        z_u = discriminator(*pad_batch(real, device=dev))
        z_i = discriminator(*pad_batch(fake, device=dev))
        loss, acc_u, acc_i = discriminator_loss(z_u, z_i)
    finally:
        discriminator.train(was)
    return {"d_acc": float(0.5 * (acc_u + acc_i)), "d_acc_uninterrupted": float(acc_u), "d_acc_interrupted": float(acc_i),
            "d_loss": float(loss), "p_detect": float(torch.sigmoid(z_i).mean())}


@torch.no_grad()
def rollout_perplexity(model: nn.Module, rollouts: Sequence[Rollout], *, interrupted: bool) -> float:
    """Perplexity under ``model`` (adapters off) of the texts after their opening: the cross-talk part of
    the interrupted texts, or the same positions of the uninterrupted ones. ``exp(-sum log p / count)``."""
    acc = NLL()
    for r in rollouts:
        ts: list[Transcript] = r.fake if interrupted else r.real
        rows = [list(t.prompt) + list(t.ids) for t in ts]
        scores = token_scores(model, rows, 1.0)  # (B, L - 1) log p(x_{i+1}), adapters off
        pos = torch.arange(scores.shape[1], device=scores.device)
        start = torch.tensor([len(t.prompt) + r.opening - 1 for t in ts], device=scores.device)
        end = torch.tensor([len(t.prompt) + len(t.ids) - 1 for t in ts], device=scores.device)
        acc = acc + NLL.of_picked(scores, (pos >= start[:, None]) & (pos < end[:, None]))  # (B, L - 1) mask
    return acc.ppl if acc.tokens else 1.0


def compare_rollouts(gan: CrosstalkGAN, before: Sequence[Rollout], after: Sequence[Rollout]) -> dict[str, Any]:
    """The report: the final discriminator on the before/after rollouts, and perplexities under each base expert."""
    out: dict[str, Any] = {"discriminator": {"before": detection(gan.discriminator, before),
                                             "after": detection(gan.discriminator, after)}}
    ppl: dict[str, Any] = {}
    for name, model in zip(gan.names, gan.experts):
        ppl[name] = {"uninterrupted": rollout_perplexity(model, before, interrupted=False),
                     "interrupted_before": rollout_perplexity(model, before, interrupted=True),
                     "interrupted_after": rollout_perplexity(model, after, interrupted=True)}
    out["perplexity"] = ppl
    out["interruptions"] = {k: sum(t.n_interruptions for r in rs for t in r.fake) / max(1, sum(len(r.fake) for r in rs))
                            for k, rs in (("before", before), ("after", after))}
    return out


def probe_accuracy(train_rollouts: Sequence[Rollout], test_rollouts: Sequence[Rollout], cfg: DiscriminatorConfig, *,
                   features: torch.Tensor | None = None, steps: int = 200, batch_size: int = 32, lr: float = 3e-3,
                   seed: int = 0) -> dict[str, float]:
    """Train a *fresh* discriminator (Adam, cross-entropy) on the texts of ``train_rollouts`` and
    report its accuracy on ``test_rollouts``: how separable interrupted text is, independent of the
    co-adapted GAN discriminator."""
    torch.manual_seed(seed)
    d = Discriminator(cfg, features)
    opt = torch.optim.Adam(d.parameters(), lr=lr)
    real = [t.ids for r in train_rollouts for t in r.real]
    fake = [t.ids for r in train_rollouts for t in r.fake]
    g = torch.Generator().manual_seed(seed)
    d.train()
    for _ in range(steps):
        i = torch.randint(0, len(real), (min(batch_size, len(real)),), generator=g).tolist()
        j = torch.randint(0, len(fake), (min(batch_size, len(fake)),), generator=g).tolist()
        loss, _, _ = discriminator_loss(d(*pad_batch([real[k] for k in i])), d(*pad_batch([fake[k] for k in j])))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return detection(d, test_rollouts)


def plot_curves(metrics_path: Path, out: Path, title: str = "cross-talk GAN") -> Path:
    """Discriminator accuracy and generator reward per step (raw and a 10-step moving average), with
    the held-out evaluations, from the loop's metrics.jsonl."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    tr = [r for r in recs if r.get("kind") == "train"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    if not tr:
        raise DataError(f"{metrics_path}: no training records to plot")

    def smooth(v: list[float], w: int = 10) -> list[float]:
        return [sum(v[max(0, i - w + 1) : i + 1]) / len(v[max(0, i - w + 1) : i + 1]) for i in range(len(v))]

    steps = [r["step"] for r in tr]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    acc = [r["d_acc"] for r in tr]
    ax.plot(steps, acc, alpha=0.3, color="C0", label="train (per step)")
    ax.plot(steps, smooth(acc), color="C0", label="train (10-step mean)")
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_d_acc"] for r in ev], "o-", color="C3", label="held-out")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="discriminator accuracy", ylim=(0, 1.02), title="discriminator")
    ax.legend(fontsize=8)
    ax = axes[1]
    rew = [r["reward"] for r in tr]
    ax.plot(steps, rew, alpha=0.3, color="C2", label="reward (per step)")
    ax.plot(steps, smooth(rew), color="C2", label="reward (10-step mean)")
    ax.plot(steps, [r["baseline"] for r in tr], color="C1", ls="--", label="baseline b")
    ax.axhline(0.0, color="grey", ls=":", lw=1)
    ax.set(xlabel="step", ylabel="generator reward", title="generators")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(out)
