"""One loader for a single-model folder: ours (``save_lm``) or a pretrained backbone, with its tokenizer.

- a backbone folder (:func:`~taskmoe.models.backbones.is_backbone_dir`: a Hugging Face
  ``config.json``) -> :func:`~taskmoe.models.backbones.load_backbone` (our ``CausalLM`` and the
  backbone's :class:`~taskmoe.data.backbone_tokenizer.BackboneTokenizer` with its chat template);
- a taskmoe component folder -> :func:`~taskmoe.models.checkpoint.load_lm` and the
  ``tokenizer.json`` in or beside it (:meth:`~taskmoe.data.tokenizer.Tokenizer.beside`).

The model comes back in eval mode; callers that train switch it to train mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.models.backbones import is_backbone_dir, load_backbone
from taskmoe.models.checkpoint import load_lm
from taskmoe.models.model import CausalLM


def load_model_folder(folder: str | Path) -> tuple[CausalLM, Any]:
    """``(model, tokenizer)`` of a model folder or a backbone folder (module docstring)."""
    folder = Path(folder)
    if is_backbone_dir(folder):
        return load_backbone(folder)
    return load_lm(folder).eval(), Tokenizer.beside(folder)


def is_backbone(folder: str | Path) -> bool:
    """True for a backbone folder (the other kind :func:`load_model_folder` reads is ours)."""
    return is_backbone_dir(folder)
