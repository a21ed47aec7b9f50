"""Modalities for DOE models: encoders (images, audio) and modality experts spliced into a sequence-routed LM.

- :mod:`taskmoe.doe.modality.encoders` — :class:`ImageEncoder`, :class:`AudioEncoder`, their configs,
  the projector into ``d_model``.
- :mod:`taskmoe.doe.modality.model` — :class:`MultimodalLM` (placeholder splice, modality-guarded
  routing, adding a modality expert, freezing), :class:`MediaInput`, save / load.
"""

from taskmoe.doe.modality.encoders import (AudioEncoder, AudioEncoderConfig, ImageEncoder, ImageEncoderConfig,
                                           Projector, build_encoder)
from taskmoe.doe.modality.model import KIND, MediaInput, MultimodalLM, load_multimodal, modality_force, save_multimodal

__all__ = ["AudioEncoder", "AudioEncoderConfig", "ImageEncoder", "ImageEncoderConfig", "Projector", "build_encoder",
           "KIND", "MediaInput", "MultimodalLM", "load_multimodal", "modality_force", "save_multimodal"]
