"""The category classifier: a small head on encoder vectors, its calibration, and class addition.

- :class:`CategoryHead`: ``x (N, D) -> logits (N, K)``, a one-hidden-layer MLP (``hidden > 0``)
  or a linear map (``hidden = 0``) on unit encoder vectors scaled by ``sqrt(D)`` (so
  pre-activations start O(1)). Confidences are ``softmax(logits / T)`` with a temperature ``T``
  stored in the head.
- :func:`fit_head`: trains the head on the k-means pseudo-labels. The head sees cached
  ``(N, D)`` features, so this is a few hundred mini-batch AdamW steps taking well under a
  second, like scikit-learn's ``LogisticRegression.fit``; it needs none of the shared loop's
  machinery (distribution, checkpoints, resume), which trains the encoder.
- :func:`fit_temperature`: temperature scaling (Guo et al. 2017): ``T* = argmin_T NLL(softmax(z/T), y)``
  on validation data, with a weak log-normal prior on ``T`` so a perfectly separated validation
  set cannot push ``T`` to 0. It changes confidences, never the argmax. :func:`expected_calibration_error` reports ECE before and after.
- :func:`add_class`: plug-and-play. The head gains one output. The old layers are frozen, so
  the old logits are bit-identical; the new logit reads a copy of the hidden layer fine-tuned
  through a rank-``r`` LoRA adapter (the shared :class:`taskmoe.layers.lora.LoRALinear`:
  ``W x + (alpha/r) B A x``, ``B = 0`` at start) and a new output row. A **replay** sample of old training vectors is distilled towards
  the old head's confidences (soft-target cross-entropy, new class's target 0), which teaches
  the new logit to stay off on old data. After training the adapter is merged into a plain MLP
  (hidden layer ``[W1; W1 + (alpha/r) B A]``, block-diagonal output), equal to the trained
  module (tested). The temperature is kept, so old confidences stay calibrated.

Glossary: ``D`` vector width, ``H`` hidden width, ``K`` categories, ``T`` temperature, ``r``
LoRA rank, ``alpha`` LoRA scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskmoe.config import Config, check_min, doc
from taskmoe.errors import DataError
from taskmoe.layers.lora import LoRALinear

ADAPTER = "new_category"


@dataclass
class ClassifierConfig(Config):
    """The classifier head, its training, and class addition."""

    hidden: int = doc(128, "hidden width H of the MLP head; 0 = a linear head")
    epochs: int = doc(40, "passes over the pseudo-labelled training vectors")
    batch_size: int = doc(256, "vectors per step")
    lr: float = doc(3e-3, "AdamW learning rate")
    weight_decay: float = doc(1e-4, "AdamW weight decay")
    lora_rank: int = doc(8, "rank r of the adapters used when a category is added")
    lora_alpha: float = doc(16.0, "adapter scale alpha (delta = alpha/r * B A)")
    add_steps: int = doc(400, "optimizer steps (batches of new + replay vectors) when adding a category")
    add_lr: float = doc(1e-2, "AdamW learning rate of the LoRA factors and the new output row when adding a category")
    replay_per_category: int = doc(256, "training vectors kept per category for replay when adding categories")
    ece_bins: int = doc(15, "equal-width confidence bins of the expected calibration error")
    seed: int = doc(0, "seed of initialisation and batch order")

    def validate(self) -> None:
        check_min(self, ("hidden",), owner="classifier")
        check_min(self, ("epochs", "add_steps", "batch_size", "lora_rank", "replay_per_category", "ece_bins"), 1,
                  owner="classifier")
        check_min(self, ("lr", "add_lr"), strict=True, owner="classifier")


class _BranchHead(nn.Module):
    """The head during class addition: old logits from the frozen head, new logits from a branch.

    ``z = [out(act(W1 h)), w_new . act((W1 + (alpha/r) B A) h) + b_new]``: the old logits are
    computed by the untouched old layers; the new class reads a LoRA-adapted copy of the hidden
    layer (or ``h`` itself for a linear head).
    """

    def __init__(self, old: "CategoryHead", branch: LoRALinear | None, new_row: nn.Linear) -> None:
        super().__init__()
        self.old, self.branch, self.new_row = old, branch, new_row
        for p in self.old.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * math.sqrt(self.old.dim)
        z_new = self.new_row(F.gelu(self.branch(h)) if self.branch is not None else h)  # (N, 1)
        return torch.cat([self.old(x), z_new], dim=-1)  # (N, K + 1)

    @torch.no_grad()
    def merged(self) -> "CategoryHead":
        """An equal plain head: hidden ``[W1; W1 + (alpha/r) B A]`` (2H rows), block-diagonal output."""
        old = self.old
        out_old = old.out
        assert isinstance(out_old, nn.Linear)
        k = out_old.out_features
        if self.branch is None:
            out = nn.Linear(out_old.in_features, k + 1)
            out.weight.copy_(torch.cat([out_old.weight, self.new_row.weight]))
            out.bias.copy_(torch.cat([out_old.bias, self.new_row.bias]))
            merged = CategoryHead(old.dim, None, out)
        else:
            h_old = old.hidden_layer
            assert isinstance(h_old, nn.Linear)
            w_new = self.branch.weight + self.branch.delta_weight(ADAPTER)  # (H, D): W1 + (alpha/r) B A
            H1, H2 = h_old.out_features, w_new.shape[0]
            hidden = nn.Linear(h_old.in_features, H1 + H2)
            hidden.weight.copy_(torch.cat([h_old.weight, w_new]))
            hidden.bias.copy_(torch.cat([h_old.bias, self.branch.bias]))
            out = nn.Linear(H1 + H2, k + 1)
            out.weight.zero_()
            out.weight[:k, :H1] = out_old.weight
            out.weight[k:, H1:] = self.new_row.weight
            out.bias.copy_(torch.cat([out_old.bias, self.new_row.bias]))
            merged = CategoryHead(old.dim, hidden, out)
        merged.temperature.copy_(old.temperature)
        return merged.eval()


class CategoryHead(nn.Module):
    """``logits = out(act(hidden(sqrt(D) x)))`` (MLP) or ``out(sqrt(D) x)`` (linear); ``probs`` uses ``T``."""

    def __init__(self, dim: int, hidden_layer: nn.Module | None, out: nn.Module) -> None:
        super().__init__()
        self.dim = dim
        self.hidden_layer = hidden_layer
        self.out = out
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * math.sqrt(self.dim)
        if self.hidden_layer is not None:
            h = F.gelu(self.hidden_layer(h))
        return self.out(h)

    @torch.no_grad()
    def probs(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Calibrated confidences ``softmax(logits / T)``: ``(N, D) -> (N, K)`` float64."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return F.softmax(self(xt).double() / self.temperature.double(), dim=-1).numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}


def build_head(dim: int, n_classes: int, hidden: int, seed: int = 0) -> CategoryHead:
    """A fresh head (``nn.Linear`` default init under ``seed``, without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hidden > 0:
            return CategoryHead(dim, nn.Linear(dim, hidden), nn.Linear(hidden, n_classes))
        return CategoryHead(dim, None, nn.Linear(dim, n_classes))


def head_from_tensors(tensors: dict[str, torch.Tensor]) -> CategoryHead:
    """Rebuild a head from its saved state (shapes give D, H and K)."""
    w_out = tensors["out.weight"]  # (K, H or D)
    if "hidden_layer.weight" in tensors:
        w_h = tensors["hidden_layer.weight"]  # (H, D)
        head = CategoryHead(w_h.shape[1], nn.Linear(w_h.shape[1], w_h.shape[0]), nn.Linear(w_out.shape[1], w_out.shape[0]))
    else:
        head = CategoryHead(w_out.shape[1], None, nn.Linear(w_out.shape[1], w_out.shape[0]))
    head.load_state_dict(tensors)
    return head.eval()


# ----------------------------------------------------------------------------- metrics
def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width bins over the top confidence.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` where bin ``b = (b/n_bins, (b+1)/n_bins]`` holds
    the rows whose top confidence falls in it, ``acc_b`` is the fraction whose argmax equals the
    label, ``conf_b`` the mean top confidence. Example: confidences 0.9, 0.9 with one right and
    one wrong -> ``|0.5 - 0.9| = 0.4``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.shape[0] == 0:
        return 0.0
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)  # (N,) bin of each row
    ece = 0.0
    for j in range(n_bins):
        m = b == j
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, prior_sigma: float = 1.0, max_iter: int = 100) -> float:
    """MAP temperature: ``argmin_T sum_i -log softmax(z_i / T)[y_i] + (log T)^2 / (2 sigma^2)``.

    Plain temperature scaling (Guo et al. 2017) minimises the NLL alone; when the validation set
    is perfectly separated that optimum runs off to ``T -> 0`` (infinitely sharp confidences).
    The log-normal prior on ``T`` (centred on 1, ``sigma = prior_sigma``) keeps it finite there
    and is negligible next to a summed NLL over many mistakes. Optimised over ``log T`` with
    L-BFGS, clamped to ``[0.05, 20]``; 1.0 when there is no validation data.
    """
    if logits.shape[0] == 0:
        return 1.0
    z = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), labels, reduction="sum") + log_t**2 / (2 * prior_sigma**2)
        loss.backward()
        return loss

    opt.step(closure)
    return float(torch.clamp(log_t.detach().exp(), 0.05, 20.0))


# ---------------------------------------------------------------------------- training
def _train(head: nn.Module, loss_of: Any, n: int, epochs: int, cfg: ClassifierConfig, lr: float | None = None) -> None:
    """Mini-batch AdamW (cosine decay) over ``n`` rows for ``epochs`` passes; ``loss_of(idx) -> loss``."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr or cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per = max(1, math.ceil(n / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per)
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, cfg.batch_size):
            loss = loss_of(perm[s : s + cfg.batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()


def fit_head(
    x: np.ndarray, y: np.ndarray, n_classes: int, cfg: ClassifierConfig,
    x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
) -> tuple[CategoryHead, dict[str, float]]:
    """Train a head on pseudo-labels, then fit its temperature on the validation set.

    Returns the head and metrics: train/val accuracy against the pseudo-labels, validation NLL
    and ECE before and after temperature scaling, and ``T``.
    """
    if len(x) == 0:
        raise DataError("classifier: no training vectors")
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    head = build_head(xt.shape[1], n_classes, cfg.hidden, cfg.seed)
    _train(head, lambda idx: F.cross_entropy(head(xt[idx]), yt[idx]), len(xt), cfg.epochs, cfg)
    metrics: dict[str, float] = {}
    with torch.no_grad():
        metrics["train_acc"] = float((head(xt).argmax(1) == yt).float().mean())
    if x_val is not None and y_val is not None and len(x_val):
        xv = torch.as_tensor(np.asarray(x_val, dtype=np.float32))
        yv = torch.as_tensor(np.asarray(y_val, dtype=np.int64))
        with torch.no_grad():
            zv = head(xv)
        metrics["val_acc"] = float((zv.argmax(1) == yv).float().mean())
        metrics["val_nll_before"] = nll(zv, yv, 1.0)
        metrics["val_ece_before"] = expected_calibration_error(F.softmax(zv.double(), -1).numpy(), yv.numpy(), cfg.ece_bins)
        t = fit_temperature(zv, yv)
        head.temperature.fill_(t)
        metrics["temperature"] = t
        metrics["val_nll"] = nll(zv, yv, t)
        metrics["val_ece"] = expected_calibration_error(head.probs(xv), yv.numpy(), cfg.ece_bins)
    return head, metrics


def add_class(
    head: CategoryHead, x_new: np.ndarray, x_replay: np.ndarray, cfg: ClassifierConfig,
) -> tuple[CategoryHead, dict[str, float]]:
    """A head with one more output: old logits frozen, the new one trained with LoRA + replay.

    The new logit comes from a LoRA-adapted copy of the hidden layer and a new output row
    (:class:`_BranchHead`); the old layers never change, so among the old categories every
    ranking is kept exactly and an old confidence can only shrink by the softmax share the new
    category takes. Loss, averaged per set, at the calibrated temperature ``T``:
    ``CE(z(x_new) / T, K) + sum_j q_j * -log softmax(z(x_replay) / T)_j`` with replay targets
    ``q = [p_old(x_replay), 0]`` (distillation: the new class must stay off on old data).
    Returns the merged plain head (same ``T``; its hidden layer grows by ``H`` rows) and metrics:
    agreement of the argmax on replay vectors, new-class accuracy on ``x_new``.
    """
    if len(x_new) == 0:
        raise DataError("add_class: no vectors for the new category")
    t = float(head.temperature)
    xn = torch.as_tensor(np.asarray(x_new, dtype=np.float32))
    xr = torch.as_tensor(np.asarray(x_replay, dtype=np.float32))
    head = head.eval()
    with torch.no_grad():
        q = F.softmax(head(xr) / t, -1)  # (R, K) old calibrated confidences
    k_old = q.shape[1]
    q = torch.cat([q, torch.zeros(q.shape[0], 1)], dim=1)  # (R, K+1)
    branch = None
    if head.hidden_layer is not None:
        assert isinstance(head.hidden_layer, nn.Linear)
        copy = nn.Linear(head.hidden_layer.in_features, head.hidden_layer.out_features)
        copy.load_state_dict(head.hidden_layer.state_dict())
        branch = LoRALinear(copy)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            branch.add_adapter(ADAPTER, cfg.lora_rank, cfg.lora_alpha)
    feat = head.hidden_layer.out_features if head.hidden_layer is not None else head.dim
    new_row = nn.Linear(feat, 1)
    with torch.no_grad():
        new_row.weight.zero_()
        new_row.bias.zero_()
    work = _BranchHead(head, branch, new_row)
    yn = torch.full((len(xn),), k_old, dtype=torch.long)
    n_r, n_n = len(xr), len(xn)
    n = max(n_r, n_n)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        i_new = idx % n_n
        loss = F.cross_entropy(work(xn[i_new]) / t, yn[i_new])
        if n_r:
            i_rep = idx % n_r
            loss = loss + torch.sum(-q[i_rep] * F.log_softmax(work(xr[i_rep]) / t, -1), dim=-1).mean()
        return loss

    _train(work, loss_of, n, max(1, math.ceil(cfg.add_steps / math.ceil(n / cfg.batch_size))), cfg, lr=cfg.add_lr)
    head.eval()
    merged = work.merged()
    metrics = {
        "replay_agreement": float((merged.probs(xr).argmax(1) == q[:, :k_old].argmax(1).numpy()).mean()) if n_r else 1.0,
        "new_acc": float((merged.probs(xn).argmax(1) == k_old).mean()),
    }
    return merged, metrics
