"""The cross-talk discriminator: a small classifier that reads a text's token ids and says whether
it was interrupted (written by two experts taking turns) or not (one expert alone).

Architecture (``B`` batch, ``T`` tokens, ``D`` width, ``E`` feature width)::

    ids (B, T) -> token features (B, T, D): own embedding, or frozen expert embeddings (B, T, E) -> Linear(E, D)
               -> n_layers x [dilated Conv1d(D, D, k, dilation 2^i, "same" padding) -> GELU -> + residual -> LayerNorm]
               -> pooling: [attention a_t = softmax_t(w . h_t), sum_t a_t h_t ; max_t h_t]   (B, 2D)
               -> MLP: Linear(2D, D) -> GELU -> Linear(D, 1) -> logit of "interrupted"   (B,)

Design choices:

- **Token features from the experts' own (frozen) embedding table** when one is given
  (``features``; :func:`expert_features`): the experts share the router's table in a trained
  system, and a classifier that starts from those vectors generalises from a few thousand
  rollouts, where one learning its own table from scratch memorises them (a probe on 256
  training / 64 held-out rollout pairs of the benchmark's experts: held-out accuracy 0.70 with
  its own table vs 0.91 with the experts' tables). The table is frozen, so neither side of the game moves
  it; it is stored with the discriminator (``feature_dim`` in the config says its width).
  Without ``features`` the discriminator learns its own embedding.
- **Detecting a switch needs a non-linear read-out.** An interrupted text mixes two styles that
  each also occur alone in uninterrupted texts (either expert may open), so the mean of its
  features lies *between* the two pure clusters, where no linear function of a pooled vector can
  separate it; hence max pooling next to attention pooling (a local "style change" detector that
  fires anywhere) and an MLP head.
- **Local features**: dilated convolutions (receptive field ``1 + (k - 1)(2^n - 1)`` tokens) see a
  few words on each side of every position, so they can see an interruption point itself.
- **Padding is exact**: padded positions are zeroed before every convolution and excluded from
  both poolings, so a text scores the same alone or right-padded in a batch (tested).
- Saved as a component folder (``config.json`` kind ``crosstalk_discriminator`` +
  ``model.safetensors``) through :mod:`taskmoe.io`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.config import Config, check, check_ints, check_range, doc
from taskmoe.errors import ConfigError
from taskmoe.io import load_component, load_state_into, save_component

__all__ = ["DiscriminatorConfig", "Discriminator", "expert_features", "pad_batch", "save_discriminator",
           "load_discriminator", "KIND"]

KIND = "crosstalk_discriminator"


@dataclass
class DiscriminatorConfig(Config):
    vocab_size: int = doc(8192, "vocabulary size (the experts' shared vocabulary)")
    d_model: int = doc(64, "width of the discriminator")
    n_layers: int = doc(3, "dilated convolution layers (layer i has dilation 2**i)")
    kernel_size: int = doc(5, "taps of each convolution (odd, so 'same' padding is symmetric)")
    dropout: float = doc(0.1, "dropout on the convolution outputs during training")
    feature_dim: int = doc(0, "width E of the frozen token-feature table (the experts' embeddings); 0 = own embedding")

    def validate(self) -> None:
        check_ints(self, ("vocab_size", "d_model", "n_layers", "kernel_size"))
        check_ints(self, ("feature_dim",), minimum=0)
        check(self.kernel_size % 2 == 1, f"DiscriminatorConfig.kernel_size must be odd, got {self.kernel_size}")
        check_range(self, ("dropout",), open_high=True)

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * (2**self.n_layers - 1)


class Discriminator(nn.Module):
    """``forward(ids (B, T), mask (B, T) bool) -> logits (B,)`` of "this text was interrupted".

    ``features`` (V, E): a frozen token-feature table (:func:`expert_features`); its width must be
    ``cfg.feature_dim``. None (with ``feature_dim = 0``) learns an own embedding.
    """

    def __init__(self, cfg: DiscriminatorConfig, features: Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        D, k = cfg.d_model, cfg.kernel_size
        if cfg.feature_dim:
            table = torch.zeros(cfg.vocab_size, cfg.feature_dim) if features is None else features.detach().float().clone()
            if tuple(table.shape) != (cfg.vocab_size, cfg.feature_dim):
                raise ConfigError(f"discriminator features are {tuple(table.shape)}, config says "
                                  f"(vocab_size, feature_dim) = ({cfg.vocab_size}, {cfg.feature_dim})")
            self.embedding = nn.Embedding.from_pretrained(table, freeze=True)  # (V, E), frozen
            self.proj: nn.Module = nn.Linear(cfg.feature_dim, D)
        else:
            if features is not None:
                raise ConfigError("discriminator features given but DiscriminatorConfig.feature_dim is 0")
            self.embedding = nn.Embedding(cfg.vocab_size, D)
            nn.init.normal_(self.embedding.weight, std=0.1)
            self.proj = nn.Identity()
        self.convs = nn.ModuleList(nn.Conv1d(D, D, k, dilation=2**i, padding=(k // 2) * 2**i) for i in range(cfg.n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(cfg.n_layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.score = nn.Linear(D, 1)  # attention-pooling scores w . h_t
        self.head = nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.Linear(D, 1))

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"Discriminator: ids must be (batch, time), got shape {tuple(ids.shape)}")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        m = mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        h = self.proj(self.embedding(ids)) * m  # (B, T, D)
        for conv, norm in zip(self.convs, self.norms):
            y = conv(h.transpose(1, 2)).transpose(1, 2)  # (B, D, T) -> (B, T, D)
            h = norm(h + self.dropout(F.gelu(y))) * m
        s = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        a = torch.softmax(s, dim=-1).nan_to_num(0.0)  # an all-padding row pools to 0
        attn = torch.einsum("bt,btd->bd", a, h)  # (B, D)
        peak = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1).nan_to_num(0.0, neginf=0.0)  # (B, D)
        return self.head(torch.cat([attn, peak], dim=-1)).squeeze(-1)  # (B,)


def expert_features(experts: Sequence[nn.Module]) -> Tensor:
    """The experts' token embeddings as one frozen feature table (V, E): their shared table once,
    or the distinct tables side by side when the experts have their own."""
    tables: list[Tensor] = []
    for m in experts:
        w = m.embedding.weight
        if not any(w is t for t in tables):
            tables.append(w)
    return torch.cat([t.detach().float() for t in tables], dim=-1)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-pad token lists -> ``(ids (B, T) long, mask (B, T) bool)``."""
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(T, 1)), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(seqs), max(T, 1), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = True
    return ids.to(device), mask.to(device)


def save_discriminator(model: Discriminator, folder: str | Path, *, meta: Mapping[str, Any] | None = None) -> Path:
    return save_component(folder, KIND, model.cfg.to_dict(), model.state_dict(), meta=meta)


def load_discriminator(folder: str | Path) -> Discriminator:
    """Rebuild a saved discriminator (CheckpointError naming the folder on any mismatch)."""
    comp = load_component(folder, KIND)
    model = Discriminator(DiscriminatorConfig.from_dict(comp.config, source=str(comp.folder / "config.json")))
    load_state_into(model, comp.weights)
    return model.eval()
