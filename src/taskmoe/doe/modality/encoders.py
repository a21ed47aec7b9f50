"""Modality encoders: images and audio -> ``n_positions`` vectors of the LM's width ``d_model``.

Each encoder is ``trunk -> pool to n_positions -> projector``:

- :class:`ImageEncoder`: ``(B, H, W)`` in [0, 1] -> resized to ``image_size`` (bilinear,
  antialiased) -> three 3x3 convolutions (the last two with stride 2: 28 -> 14 -> 7) -> adaptive
  average pooling to a ``grid x grid`` patch grid -> ``(B, grid^2, C)`` + learned patch positions.
- :class:`AudioEncoder`: ``(B, S)`` waveforms at ``sample_rate`` -> log-mel spectrogram
  (:func:`taskmoe.ops.spectrogram.log_mel`, filterbank computed here and kept as a buffer) ->
  per-band normalisation -> three 1-D convolutions over time (two with stride 2) -> adaptive
  average pooling to ``n_positions`` time segments -> ``(B, n_positions, C)`` + learned positions.
- :class:`Projector` (both): ``Linear(C, D) -> GELU -> Linear(D, D)`` (LLaVA-1.5's two-layer MLP)
  into the LM's embedding space.

Design choices: small convolutional trunks (a few hundred thousand parameters) rather than a
pretrained ViT/Whisper, because nothing may be downloaded and the inputs are 28x28 digits and
one-second words; :meth:`ImageEncoder.features` is the trunk alone, so a benchmark can train the
same trunk with a linear head as its CNN-alone baseline. Configs are small dataclasses saved
with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.config import Config, check, doc
from taskmoe.ops.spectrogram import log_mel, mel_filterbank


@dataclass
class ImageEncoderConfig(Config):
    image_size: int = doc(28, "images are resized to image_size x image_size before the trunk")
    channels: int = doc(64, "channels of the convolutional trunk (the first layer has half)")
    grid: int = doc(2, "patch grid side: the encoder emits grid * grid positions")

    def validate(self) -> None:
        check(self.image_size >= 4, f"ImageEncoderConfig.image_size must be >= 4, got {self.image_size}")
        check(self.channels >= 2 and self.grid >= 1, f"ImageEncoderConfig: channels >= 2 and grid >= 1 needed, "
                                                     f"got {self.channels}, {self.grid}")

    @property
    def n_positions(self) -> int:
        return self.grid * self.grid


@dataclass
class AudioEncoderConfig(Config):
    sample_rate: int = doc(8000, "waveforms are resampled to this rate (Hz) before the spectrogram")
    clip_seconds: float = doc(1.5, "clips are cropped or zero-padded to this length")
    n_fft: int = doc(256, "STFT frame length in samples")
    hop: int = doc(80, "STFT step in samples")
    n_mels: int = doc(40, "mel bands")
    channels: int = doc(96, "channels of the 1-D convolutional trunk")
    n_positions: int = doc(4, "time segments the encoder emits")

    def validate(self) -> None:
        check(self.sample_rate > 0 and self.clip_seconds > 0, "AudioEncoderConfig: sample_rate and clip_seconds must be > 0")
        check(0 < self.hop <= self.n_fft and self.n_fft < self.clip_samples,
              f"AudioEncoderConfig: need 0 < hop <= n_fft < clip samples, got {self.hop}, {self.n_fft}, {self.clip_samples}")
        check(self.n_mels >= 1 and self.channels >= 1 and self.n_positions >= 1,
              "AudioEncoderConfig: n_mels, channels and n_positions must be >= 1")

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))


class Projector(nn.Module):
    """``Linear(C, D) -> GELU -> Linear(D, D)``: encoder features into the LM's embedding space."""

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_model), nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _MediaEncoder(nn.Module):
    """What both encoders share: ``cfg``, learned positions ``pos`` (n_positions, C) and the projector."""

    cfg: Any

    def _head(self, channels: int, d_model: int) -> None:
        """Create ``pos`` and ``proj`` (after the trunk, so the parameters' seeded init order is fixed)."""
        self.pos = nn.Parameter(torch.zeros(self.cfg.n_positions, channels))
        self.proj = Projector(channels, d_model)

    @property
    def n_positions(self) -> int:
        return self.cfg.n_positions


class ImageEncoder(_MediaEncoder):
    """``(B, H, W)`` images in [0, 1] -> ``(B, grid^2, d_model)`` (see module docstring)."""

    modality = "image"

    def __init__(self, cfg: ImageEncoderConfig, d_model: int) -> None:
        super().__init__()
        self.cfg, C = cfg, cfg.channels
        self.trunk = nn.Sequential(
            nn.Conv2d(1, C // 2, 3, padding=1), nn.GELU(),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1), nn.BatchNorm2d(C), nn.GELU(),
            nn.Conv2d(C, C, 3, stride=2, padding=1), nn.BatchNorm2d(C), nn.GELU(),
        )
        self._head(C, d_model)

    def features(self, images: Tensor) -> Tensor:
        """Trunk feature maps ``(B, C, h, w)`` of ``images`` (B, H, W)."""
        if images.dim() != 3:
            raise ValueError(f"ImageEncoder: expected images (B, H, W), got shape {tuple(images.shape)}")
        x = images.unsqueeze(1).float()  # (B, 1, H, W)
        S = self.cfg.image_size
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        return self.trunk(x * 2.0 - 1.0)

    def forward(self, images: Tensor) -> Tensor:
        g = self.cfg.grid
        f = F.adaptive_avg_pool2d(self.features(images), g)  # (B, C, g, g)
        return self.proj(f.flatten(2).transpose(1, 2) + self.pos)  # (B, g*g, D)


class AudioEncoder(_MediaEncoder):
    """``(B, S)`` waveforms at ``cfg.sample_rate`` -> ``(B, n_positions, d_model)`` (see module docstring)."""

    modality = "audio"

    def __init__(self, cfg: AudioEncoderConfig, d_model: int) -> None:
        super().__init__()
        self.cfg, C = cfg, cfg.channels
        self.register_buffer("fb", mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate), persistent=False)
        self.norm = nn.BatchNorm1d(cfg.n_mels)
        self.trunk = nn.Sequential(
            nn.Conv1d(cfg.n_mels, C, 5, padding=2), nn.BatchNorm1d(C), nn.GELU(),
            nn.Conv1d(C, C, 5, stride=2, padding=2), nn.BatchNorm1d(C), nn.GELU(),
            nn.Conv1d(C, C, 5, stride=2, padding=2), nn.BatchNorm1d(C), nn.GELU(),
        )
        self._head(C, d_model)

    def spectrogram(self, wave: Tensor) -> Tensor:
        """``(B, S)`` -> log-mel ``(B, n_mels, frames)``."""
        if wave.dim() != 2:
            raise ValueError(f"AudioEncoder: expected waveforms (B, S), got shape {tuple(wave.shape)}")
        return log_mel(wave.float(), self.fb, self.cfg.n_fft, self.cfg.hop)

    def forward(self, wave: Tensor) -> Tensor:
        h = self.trunk(self.norm(self.spectrogram(wave)))  # (B, C, frames / 4)
        h = F.adaptive_avg_pool1d(h, self.cfg.n_positions)  # (B, C, N)
        return self.proj(h.transpose(1, 2) + self.pos)  # (B, N, D)


ENCODERS: dict[str, tuple[type[Config], type[nn.Module]]] = {
    "image": (ImageEncoderConfig, ImageEncoder),
    "audio": (AudioEncoderConfig, AudioEncoder),
}


def build_encoder(modality: str, cfg: Config | dict | None, d_model: int) -> nn.Module:
    """The encoder of ``modality`` for an LM of width ``d_model`` (``cfg`` a config, its dict, or None = defaults)."""
    if modality not in ENCODERS:
        raise ValueError(f"no encoder for modality {modality!r}; known: {sorted(ENCODERS)}")
    cfg_cls, enc_cls = ENCODERS[modality]
    if cfg is None:
        cfg = cfg_cls()
    elif isinstance(cfg, dict):
        cfg = cfg_cls.from_dict(cfg, source=f"{modality} encoder config")
    return enc_cls(cfg, d_model)
