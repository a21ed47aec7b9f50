"""``BackboneEncoder``: route on the pretrained backbone's own hidden states (kind ``"backbone"``).

A router of a backbone system speaks the backbone's token ids (its tokenizer and vocabulary),
so the encoder can read them directly, with no re-tokenisation:

    h = block_L(... block_1(embed(ids)))          # the first ``layer`` decoder blocks, no cache
    z = mean_{t >= 1} h_t                         # mean over the prompt (position 0 left out)
    v = (z - mu) / ||z - mu||                     # centred on the training mean mu, unit norm

Design choices:

- **A chosen layer, by running the first ``layer`` blocks** of the backbone (:class:`CausalLM`
  keeps its blocks in a list), so nothing in the model changes and the deeper layers cost nothing.
  Middle layers carry topic better than the last one, which is shaped for next-token prediction.
- **Position 0 is left out of the mean** (when the prompt has more than one token): decoder LMs
  use the first position as an attention sink with activations orders of magnitude larger than
  the rest, which would dominate every cosine.
- **Centring** on the mean training vector ``mu`` (fitted, stored as the encoder's one tensor):
  pooled residual streams share a large common direction; removing it is what makes cosines
  between documents informative (the k-means and classifier downstream read cosines).
- **Adapters off**: in a backbone system the same model object carries the experts' LoRA
  adapters; the encoder always reads the base model (:func:`~taskmoe.layers.lora.use_adapter`
  with ``None``, under the model's :func:`~taskmoe.models.switch_lock.switch_lock`), so routing never
  depends on which expert ran last, nor on a decode running in another thread.
- **The model is shared, not owned**: :meth:`attach` hands in an already loaded backbone (the
  system loader does, so the 135M weights are in memory once); otherwise it is loaded lazily
  from ``path`` with :func:`~taskmoe.models.backbones.load_backbone` (safetensors only).

Glossary: L = ``layer``, D = the backbone's hidden size, T = prompt tokens (cut to ``max_length``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np
import torch
from torch import nn

from taskmoe.config import Config, check, doc
from taskmoe.errors import ConfigError
from taskmoe.layers.lora import lora_layers, use_adapter
from taskmoe.models.switch_lock import switch_lock
from taskmoe.router.encoders.base import NotFittedError, Seqs, Trainer, normalize_rows

__all__ = ["BackboneEncoderConfig", "BackboneEncoder", "pool_hidden", "attach_backbone"]


@dataclass
class BackboneEncoderConfig(Config):
    """Mean-pooled hidden states of a layer of the backbone (see the module docstring)."""

    path: str = doc("", "backbone folder (taskmoe backbone import); the system loader attaches its loaded model instead")
    layer: int = doc(8, "pool the output of this many decoder blocks (0 = the token embeddings)")
    max_length: int = doc(128, "read at most this many prompt tokens (the first ones)")
    batch_size: int = doc(16, "sequences per forward pass")

    def validate(self) -> None:
        check(self.layer >= 0, f"backbone.layer must be >= 0, got {self.layer}")
        check(self.max_length >= 1, f"backbone.max_length must be >= 1, got {self.max_length}")
        check(self.batch_size >= 1, f"backbone.batch_size must be >= 1, got {self.batch_size}")


@torch.no_grad()
def pool_hidden(model: nn.Module, seqs: Seqs, layer: int, max_length: int, batch_size: int) -> np.ndarray:
    """``(N, D)`` float32: mean of block ``layer``'s output over positions 1.. of each sequence
    (position 0 alone for a one-token sequence); zero rows for empty sequences.

    Sequences are right-padded within a batch (causal attention: padding after a token never
    changes that token's hidden state) and sorted by length, so padding stays small.
    """
    blocks = model.blocks  # type: ignore[attr-defined]
    if layer > len(blocks):
        raise ConfigError(f"backbone.layer {layer} is deeper than the backbone's {len(blocks)} blocks")
    emb = model.embedding  # type: ignore[attr-defined]
    out = np.zeros((len(seqs), emb.embedding_dim), dtype=np.float32)
    cut = [list(map(int, s))[:max_length] for s in seqs]
    order = [i for i in np.argsort([len(s) for s in cut], kind="stable") if cut[i]]
    with switch_lock(model), use_adapter(model, None) if lora_layers(model) else contextlib.nullcontext():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            n = max(len(cut[i]) for i in idx)
            ids = torch.zeros(len(idx), n, dtype=torch.long)
            mask = torch.zeros(len(idx), n)
            for r, i in enumerate(idx):
                ids[r, : len(cut[i])] = torch.tensor(cut[i])
                mask[r, 1 if len(cut[i]) > 1 else 0 : len(cut[i])] = 1.0
            x = emb(ids)
            for blk in blocks[:layer]:
                x, _ = blk(x, None)
            m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
            out[idx] = ((x * m).sum(1) / m.sum(1)).float().numpy()
    return out


class BackboneEncoder:
    """Router encoder on the backbone's hidden states (kind ``"backbone"``)."""

    kind: ClassVar[str] = "backbone"

    def __init__(self, cfg: BackboneEncoderConfig, model: nn.Module | None = None) -> None:
        self.cfg = cfg
        self._model = model
        self.mean: np.ndarray | None = None  # (D,) training mean mu

    def attach(self, model: nn.Module) -> "BackboneEncoder":
        """Use this already loaded backbone (instead of loading ``cfg.path``)."""
        self._model = model
        return self

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            from taskmoe.models.backbones import load_backbone

            if not self.cfg.path or not Path(self.cfg.path).is_dir():
                raise ConfigError(f"backbone.path: backbone folder not found: {self.cfg.path!r} "
                                  "(create one with `taskmoe backbone import`)")
            self._model, _ = load_backbone(self.cfg.path)
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.embedding.embedding_dim)  # type: ignore[union-attr]

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def _raw(self, seqs: Seqs) -> np.ndarray:
        return pool_hidden(self.model, seqs, self.cfg.layer, self.cfg.max_length, self.cfg.batch_size)

    def fit(self, seqs: Seqs, *, trainer: Trainer | None = None, special_ids: Iterable[int] = ()) -> "BackboneEncoder":
        """mu = the mean pooled vector of the (non-empty) training sequences; nothing is trained."""
        raw = self._raw(seqs)
        ok = self.readable(seqs)
        if not ok.any():
            raise ConfigError("backbone encoder: every training sequence is empty")
        self.mean = raw[ok].mean(0)
        return self

    def encode(self, seqs: Seqs) -> np.ndarray:
        if self.mean is None:
            raise NotFittedError("backbone encoder is not fitted (call fit or load a router folder)")
        x = self._raw(seqs) - self.mean
        x[~self.readable(seqs)] = 0.0
        return normalize_rows(x)

    def readable(self, seqs: Seqs) -> np.ndarray:
        return np.array([len(s) > 0 for s in seqs], dtype=bool)

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            raise NotFittedError("backbone encoder is not fitted")
        return {"mean": torch.from_numpy(np.asarray(self.mean, dtype=np.float32))}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **_: Any) -> "BackboneEncoder":
        enc = cls(BackboneEncoderConfig.from_dict(config, source="router encoder config"))
        if "mean" not in tensors:
            raise ConfigError("backbone encoder: saved router has no encoder.mean tensor")
        enc.mean = tensors["mean"].float().numpy()
        return enc


def attach_backbone(router: Any, model: nn.Module) -> None:
    """Share ``model`` with ``router``'s encoder when it is a backbone encoder (no-op otherwise)."""
    if isinstance(getattr(router, "encoder", None), BackboneEncoder):
        router.encoder.attach(model)

