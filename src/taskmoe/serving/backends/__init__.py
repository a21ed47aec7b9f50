"""Backends the server can drive (see :mod:`taskmoe.serving.backend` for the protocol).

- :class:`~taskmoe.serving.backends.lm.LMBackend`: plain causal LM folders (route key = model id);
- :class:`~taskmoe.serving.backends.doe.DOEBackend`: a DOE model (key = the experts its gates accept);
- :class:`~taskmoe.serving.backends.multimodal.MultimodalBackend`: a multimodal DOE model (image/audio parts);
- :class:`~taskmoe.serving.backends.imoe.SystemBackend`: a trained IMoE run folder (key = the experts
  the router selects).

:func:`load_backend` picks the backend from what a folder holds. Each backend module is imported
only when used.
"""

from __future__ import annotations

from pathlib import Path

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import CONFIG_FILE, read_json
from taskmoe.manifest import MANIFEST_FILE
from taskmoe.serving.backend import Backend

DOE_KIND = "doe"  # taskmoe.doe.model.KIND (not imported: loading a plain LM should not import DOE)
MULTIMODAL_KIND = "multimodal"  # taskmoe.doe.modality.model.KIND


def load_backend(path: str | Path, *, name: str | None = None, weights: str = "fp32") -> Backend:
    """The backend for a folder: an IMoE run (taskmoe.json), a DOE model, an LM, or a folder of LMs.

    ``weights="int4"`` (a backbone folder or a backbone system only) keeps the backbone's projections in 4 bits."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder")
    if (path / MANIFEST_FILE).is_file():
        from taskmoe.serving.backends.imoe import SystemBackend

        return SystemBackend.load(path, name=name, weights=weights)
    from taskmoe.models.backbones import is_backbone_dir

    if is_backbone_dir(path):
        from taskmoe.serving.backends.lm import LMBackend

        return LMBackend.from_backbone(path, name=name, weights=weights)
    if weights != "fp32":
        raise ConfigError(f"{path}: --weights {weights} applies to a backbone folder or a backbone system, "
                          "not to models trained from scratch")
    if (path / CONFIG_FILE).is_file():
        raw = read_json(path / CONFIG_FILE)
        if isinstance(raw, dict) and raw.get("kind") == DOE_KIND:
            from taskmoe.serving.backends.doe import DOEBackend

            return DOEBackend.load(path, name=name)
        if isinstance(raw, dict) and raw.get("kind") == MULTIMODAL_KIND:
            from taskmoe.serving.backends.multimodal import MultimodalBackend

            return MultimodalBackend.load(path, name=name)
    from taskmoe.serving.backends.lm import LMBackend

    return LMBackend.load(path, name=name)


__all__ = ["load_backend"]
