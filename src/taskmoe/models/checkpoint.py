"""Save and load a ``CausalLM`` built by one of :data:`taskmoe.models.builders.BUILDERS`.

On disk (via :func:`taskmoe.io.save_component`)::

    <folder>/config.json         {"format_version", "kind", "config": {"builder", "lm": <its config>}, "meta"}
    <folder>/model.safetensors   the state dict (the tied head is the embedding, stored once)

Loading rebuilds the model with the named builder and checks every tensor name and shape against
it, so a vocabulary or width mismatch raises :class:`~taskmoe.errors.CheckpointError` naming the
file. A shared embedding can be passed in; it is then kept as is (its owner saves it) and
``include_embedding=False`` omits it from the file. ``"lm"`` is read with the builder's own config
class (:data:`~taskmoe.models.builders.CONFIGS`), which also reads the old flat union form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import CONFIG_FILE, check_state, load_component, save_component
from taskmoe.models.builders import BUILDERS, CONFIGS
from taskmoe.models.model import CausalLM

EMBEDDING_KEY = "embedding.weight"


def save_lm(model: CausalLM, folder: str | Path, kind: str = "lm", *, meta: Mapping[str, Any] | None = None,
            include_embedding: bool = True) -> Path:
    """Write ``model`` to ``folder`` atomically; ``kind`` names the component ("expert", "summarizer", ...)."""
    if model.builder not in BUILDERS or model.config is None:
        raise ConfigError(f"save_lm: this model has builder {model.builder!r}, not one of {sorted(BUILDERS)} "
                          "(a model built with a custom mlp_factory is saved by the component that owns it)")
    tensors = dict(model.state_dict())
    if not include_embedding:
        tensors.pop(EMBEDDING_KEY)
    return save_component(folder, kind, {"builder": model.builder, "lm": model.config.to_dict(),
                                         "includes_embedding": include_embedding},
                          tensors, meta=meta)


def load_lm(folder: str | Path, kind: str | tuple[str, ...] | None = None, *, embedding: nn.Embedding | None = None,
            device: str | torch.device = "cpu") -> CausalLM:
    """Rebuild and load a model saved by :func:`save_lm`; ``embedding`` shares an existing one."""
    comp = load_component(folder, kind)
    source = comp.folder / CONFIG_FILE
    builder = comp.config.get("builder")
    if builder not in BUILDERS:
        raise CheckpointError(f"{source}: builder {builder!r} is not one of {sorted(BUILDERS)}")
    cfg = CONFIGS[builder].from_dict(comp.config.get("lm", {}), source=f"{source}: lm")  # reads old flat configs too
    includes = comp.config.get("includes_embedding", True)
    if not includes and embedding is None:
        raise CheckpointError(f"{comp.weights}: saved without its embedding; pass the shared embedding to load_lm")
    try:
        model = BUILDERS[builder](cfg, embedding)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
    tensors = comp.tensors()
    expected = dict(model.state_dict())
    if embedding is not None:
        expected.pop(EMBEDDING_KEY)
        tensors.pop(EMBEDDING_KEY, None)
    check_state(expected, tensors, comp.weights)
    model.load_state_dict(tensors, strict=embedding is None)
    return model.to(device)
