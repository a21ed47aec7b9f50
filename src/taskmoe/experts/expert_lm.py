"""An IMoE expert: a :func:`taskmoe.models.expert_lm` (TCN + linear attention) around the router's
shared token embedding, and its component folder.

Design choices:

- **One table, stored once.** Every expert is built around the router's ``nn.Embedding`` (the
  seed: "all the experts share a vocab and embeddings with the classifier"); the output head is
  tied to it. By default the table is *frozen* (the router is never touched again after it is
  fitted) and an expert folder holds only the expert's own weights.
- **Fine-tuning per expert is an injected choice, not a flag inside the model**:
  :func:`build_expert` with ``fine_tune_embedding=True`` gives the expert its own trainable
  *copy* of the shared table, so the router's table never moves. Whether a folder stores a
  table follows from the model itself (:func:`save_expert` stores one exactly when the
  expert's table is not the shared one), and :func:`load_expert` reads that back, so nothing
  has to be remembered beside the folder.
- **Loading for the store.** :func:`expert_loader` is the ``loader(folder) -> nn.Module`` the
  :class:`~taskmoe.experts.store.ExpertStore` is injected with; :func:`open_store` registers a
  run's ``experts/`` folder and tells the store not to charge the shared table to any expert.

On disk (``runs/<name>/experts/<expert>/``): ``config.json`` (kind ``"expert"``, the builder and
the ``ExpertLMConfig``, ``includes_embedding``) and ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.experts.store import ExpertStore
from taskmoe.io import load_component
from taskmoe.models.builders import expert_lm
from taskmoe.models.checkpoint import load_lm, save_lm
from taskmoe.models.config import ExpertLMConfig, LMConfig
from taskmoe.models.model import CausalLM

KIND = "expert"

__all__ = ["KIND", "expert_config", "build_expert", "save_expert", "load_expert", "expert_loader", "open_store",
           "owns_embedding"]


def expert_config(shared: nn.Embedding, base: LMConfig | None = None, **overrides: Any) -> ExpertLMConfig:
    """``base`` (default ``ExpertLMConfig()``; a plain ``LMConfig`` gets the expert defaults) with
    ``vocab_size`` / ``d_model`` taken from the shared table.

    A ``vocab_size`` or ``d_model`` override that disagrees with the table is an error, since the
    expert could not share it.
    """
    V, D = shared.num_embeddings, shared.embedding_dim
    for key, want in (("vocab_size", V), ("d_model", D)):
        if key in overrides and overrides[key] != want:
            raise ConfigError(f"expert {key}={overrides[key]} disagrees with the shared embedding table ({V} x {D})")
    overrides.update(vocab_size=V, d_model=D)
    return ExpertLMConfig.coerce(base or ExpertLMConfig()).replace(**overrides)


def build_expert(cfg: ExpertLMConfig, shared: nn.Embedding, *, fine_tune_embedding: bool = False) -> CausalLM:
    """A fresh expert around ``shared``.

    ``fine_tune_embedding=False`` (default): the expert uses ``shared`` itself, frozen
    (``requires_grad=False``; the optimizer only sees the expert's blocks and norm).
    ``True``: the expert gets its own trainable copy of the table, initialised from ``shared``.
    """
    if fine_tune_embedding:
        table = nn.Embedding(shared.num_embeddings, shared.embedding_dim)
        with torch.no_grad():
            table.weight.copy_(shared.weight)
    else:
        table = shared
        table.weight.requires_grad_(False)
    return expert_lm(cfg, table)


def owns_embedding(model: CausalLM, shared: nn.Embedding) -> bool:
    """True when the expert's table is its own (fine-tuned copy), False when it is ``shared``."""
    return model.embedding.weight is not shared.weight


def save_expert(model: CausalLM, folder: str | Path, shared: nn.Embedding, *,
                meta: Mapping[str, Any] | None = None) -> Path:
    """Write the expert's folder; the shared table is left out unless the expert owns a copy."""
    if model.embedding.weight.shape != shared.weight.shape:
        raise ConfigError(f"expert table is {tuple(model.embedding.weight.shape)} but the shared table is "
                          f"{tuple(shared.weight.shape)}")
    return save_lm(model, folder, KIND, meta=meta, include_embedding=owns_embedding(model, shared))


def load_expert(folder: str | Path, shared: nn.Embedding, *, device: str | torch.device = "cpu") -> CausalLM:
    """Rebuild an expert saved by :func:`save_expert`.

    A folder without a table is built around ``shared`` (which must match its vocabulary and
    width; a mismatch raises :class:`~taskmoe.errors.CheckpointError` naming the file); a folder
    with its own fine-tuned table loads that table instead.
    """
    comp = load_component(folder, KIND)
    lm = comp.config.get("lm", {})
    want = (lm.get("vocab_size"), lm.get("d_model"))
    got = (shared.num_embeddings, shared.embedding_dim)
    if want != got:
        raise CheckpointError(f"{comp.folder / 'config.json'}: expert expects a {want[0]} x {want[1]} embedding table "
                              f"but the shared table is {got[0]} x {got[1]} (vocabulary size or width mismatch)")
    owns = bool(comp.config.get("includes_embedding", True))
    return load_lm(folder, KIND, embedding=None if owns else shared, device=device)


def expert_loader(shared: nn.Embedding, *, device: str | torch.device = "cpu") -> Callable[[Path], nn.Module]:
    """The ``loader(folder)`` an :class:`ExpertStore` is injected with, sharing ``shared``."""

    def load(folder: Path) -> nn.Module:
        model = load_expert(folder, shared, device=device)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    return load


def open_store(experts_dir: str | Path, shared: nn.Embedding, *, max_experts: int | None = None,
               max_bytes: int | None = None, device: str | torch.device = "cpu") -> ExpertStore:
    """An :class:`ExpertStore` over every expert folder in ``experts_dir`` (nothing is read yet)."""
    store = ExpertStore(expert_loader(shared, device=device), max_experts=max_experts, max_bytes=max_bytes,
                        exclude_shared=[shared.weight])
    store.register_dir(experts_dir)
    return store
