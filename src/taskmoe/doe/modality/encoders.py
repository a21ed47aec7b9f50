"""Modality encoders: images and audio -> ``n_positions`` vectors of the LM's width ``d_model``.

Each encoder is ``trunk -> pool to n_positions -> projector``:

- :class:`ImageEncoder`: ``(B, H, W)`` in [0, 1] -> resized to ``image_size`` (bilinear,
  antialiased) -> [training: a random affine map, :func:`random_affine`] -> three 3x3 convolutions
  (the last two with stride 2: 28 -> 14 -> 7) -> adaptive average pooling to a ``grid x grid``
  patch grid, plus (``summary``) one last position summarising the whole map -> ``(B, grid^2 + 1, C)``
  + learned positions.
- :class:`AudioEncoder`: ``(B, S)`` waveforms at ``sample_rate`` -> [training: a random delay,
  :func:`random_delay`] -> log-mel spectrogram (:func:`taskmoe.ops.spectrogram.log_mel`,
  filterbank kept as a buffer) -> relative to the clip's maximum and floored at
  ``-dynamic_range`` (:func:`relative_log_mel`) -> [training: SpecAugment masks,
  :func:`spec_masks`] -> per-band normalisation -> three 1-D convolutions over time (two with
  stride 2) -> adaptive average pooling to ``segments`` time segments, plus (``summary``) one last
  position summarising the whole clip -> ``(B, segments + 1, C)`` + learned positions.
- :class:`Projector` (both): ``Linear(C, D) -> GELU -> Linear(D, D)`` (LLaVA-1.5's two-layer MLP)
  into the LM's embedding space.

Design choices: small convolutional trunks (a few hundred thousand parameters) rather than a
pretrained ViT/Whisper, because nothing may be downloaded and the inputs are 28x28 digits and
one-second words; :meth:`ImageEncoder.features` is the trunk alone, so a benchmark can train the
same trunk with a linear head as its CNN-alone baseline. Configs are small dataclasses saved
with the model.

**The summary position** (CLS-style) is the one the answer is read from: the templates put the
medium right before the answer (:mod:`taskmoe.data.media_tasks`), so the answer's first token is
predicted at the medium's last position, whose input is the encoder's pooled view of the whole
medium and whose attention query (reading the question) the projector writes, instead of at a
text token whose frozen query must find the medium. Measured at 600 steps on MNIST (2000 test
images, 2-core box, loaded): 83.0% -> 84.6%, a small gain. What the summary holds
(``summary_from``): ``"mean"`` = the feature map averaged (``(B, C)``), or ``"flat"`` = a linear
map ``Linear(N C, C)`` of all ``N`` patch / segment vectors concatenated -- exactly the view a
CNN's linear head over the pooled grid has, so the position the answer is read from loses no
spatial information to the frozen LM's attention (which would otherwise have to gather it from
the patch positions). Measured on MNIST at 300 steps (2000 test images, 2-core box, with the
head adapter's standard init, :class:`~taskmoe.doe.modality.model.HeadAdapter`): generated
answer 87.7% (``mean``) -> 94.4% (``flat``), vs 93.8% for the same trunk + linear head trained
alone; a linear probe of the final hidden state at the summary position was 93% with
``mean``, so the answer position lacked what the patches held. ``flat`` is the image default;
audio keeps ``mean`` (its 98-99.7% on FSDD were measured with it). With ``flat``, ``head_init`` 2
and the schedule annealed to zero, the full benchmark (``bench.modality``, 1500 steps x 64, all
10k test images, 2-core box, lightly loaded) went from 96.87% to 98.66%, against 98.56% for the
trunk alone in the same run (docs/benchmarks.md).

Augmentation lives in the encoders and acts only in training mode (``self.training``), so every
recipe that trains an encoder -- the modality expert and the CNN-alone baseline alike -- gets
the same one and inference is deterministic: small random rotations, scalings and shifts of
digits (the classic MNIST augmentation), and for speech a random onset delay, plus optional
SpecAugment frequency and time masks (Park et al., 2019) set to the floor value (silence) --
off by default, since on FSDD's one-second words two masks of each kind cost the trunk alone 4
points at 1000 steps (95.3% vs 99.3%, 2-core box, loaded). The audio
front end is gain-invariant: ``relative_log_mel`` subtracts the clip's maximum, so a quiet and
a loud recording of the same word give the same features, and the zero padding of a short clip
is exactly the floor, like its silences (FSDD clips are 0.2-2.2 s, median 0.4 s; ``clip_seconds
= 1.0`` keeps 99% of them whole).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.config import Config, check, doc
from taskmoe.ops.spectrogram import log_mel, mel_filterbank


SUMMARY_FROM = ("mean", "flat")


def check_summary(cfg: Config) -> None:
    """``cfg.summary_from`` must be one of :data:`SUMMARY_FROM` (the error names the config class)."""
    check(cfg.summary_from in SUMMARY_FROM, f"{type(cfg).__name__}.summary_from must be one of {list(SUMMARY_FROM)}, "
                                            f"got {cfg.summary_from!r}")


@dataclass
class ImageEncoderConfig(Config):
    image_size: int = doc(28, "images are resized to image_size x image_size before the trunk")
    channels: int = doc(64, "channels of the convolutional trunk (the first layer has half)")
    grid: int = doc(2, "patch grid side: the encoder emits grid * grid patch positions (+ the summary)")
    summary: bool = doc(True, "emit one more position last, summarising the whole feature map (module docstring)")
    summary_from: str = doc("flat", "the summary position: 'flat' = a linear map of all grid patches concatenated, "
                                    "'mean' = the feature map's mean (folders saved before this field: 'mean')")
    rotate: float = doc(10.0, "training augmentation: rotation drawn from [-rotate, rotate] degrees (0 = off)")
    scale: float = doc(0.1, "training augmentation: zoom factor drawn from [1 - scale, 1 + scale]")
    shift: float = doc(0.1, "training augmentation: shift drawn from [-shift, shift] of the image side, per axis")

    def validate(self) -> None:
        check(self.image_size >= 4, f"ImageEncoderConfig.image_size must be >= 4, got {self.image_size}")
        check(self.channels >= 2 and self.grid >= 1, f"ImageEncoderConfig: channels >= 2 and grid >= 1 needed, "
                                                     f"got {self.channels}, {self.grid}")
        check_summary(self)
        check(self.rotate >= 0 and 0 <= self.scale < 1 and 0 <= self.shift < 1,
              f"ImageEncoderConfig: need rotate >= 0, 0 <= scale < 1, 0 <= shift < 1, "
              f"got {self.rotate}, {self.scale}, {self.shift}")

    @property
    def n_positions(self) -> int:
        return self.grid * self.grid + int(self.summary)


@dataclass
class AudioEncoderConfig(Config):
    sample_rate: int = doc(8000, "waveforms are resampled to this rate (Hz) before the spectrogram")
    clip_seconds: float = doc(1.0, "clips are cropped or zero-padded to this length")
    n_fft: int = doc(256, "STFT frame length in samples")
    hop: int = doc(80, "STFT step in samples")
    n_mels: int = doc(40, "mel bands")
    dynamic_range: float = doc(8.0, "log-mel values are taken relative to the clip's maximum and floored at "
                                     "-dynamic_range (natural log of power: 8 = 35 dB)")
    channels: int = doc(96, "channels of the 1-D convolutional trunk")
    segments: int = doc(4, "time segments the encoder emits (+ the summary)")
    summary: bool = doc(True, "emit one more position last, summarising the whole clip (module docstring)")
    summary_from: str = doc("mean", "the summary position: 'mean' = the clip's mean over time, 'flat' = a linear map "
                                    "of all segments concatenated")
    delay: float = doc(0.1, "training augmentation: the clip starts after a random delay of up to this many seconds")
    masks: int = doc(0, "training augmentation (SpecAugment): frequency masks and time masks per clip, each "
                        "(0 = off: 2 masks cost 4 points on FSDD at 1000 steps)")
    mask_bands: int = doc(6, "a frequency mask covers up to this many mel bands")
    mask_frames: int = doc(10, "a time mask covers up to this many frames")

    def validate(self) -> None:
        check(self.sample_rate > 0 and self.clip_seconds > 0, "AudioEncoderConfig: sample_rate and clip_seconds must be > 0")
        check(0 < self.hop <= self.n_fft and self.n_fft < self.clip_samples,
              f"AudioEncoderConfig: need 0 < hop <= n_fft < clip samples, got {self.hop}, {self.n_fft}, {self.clip_samples}")
        check(self.n_mels >= 1 and self.channels >= 1 and self.segments >= 1,
              "AudioEncoderConfig: n_mels, channels and segments must be >= 1")
        check_summary(self)
        check(self.dynamic_range > 0 and self.delay >= 0 and min(self.masks, self.mask_bands, self.mask_frames) >= 0,
              "AudioEncoderConfig: dynamic_range > 0 and delay, masks, mask_bands, mask_frames >= 0 needed")

    @property
    def n_positions(self) -> int:
        return self.segments + int(self.summary)

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))


def random_affine(x: Tensor, rotate: float, scale: float, shift: float) -> Tensor:
    """Each image of ``x`` (B, 1, H, W) through its own random affine map (bilinear, zeros outside).

    ``theta = [[s cos a, -s sin a, tx], [s sin a, s cos a, ty]]`` in ``affine_grid``'s normalised
    coordinates, ``a ~ U(-rotate, rotate)`` degrees, ``s ~ U(1 - scale, 1 + scale)``,
    ``t ~ U(-2 shift, 2 shift)`` (a shift of ``shift`` image sides).
    """
    B = x.shape[0]
    u = torch.rand(B, 4, device=x.device) * 2 - 1  # (B, 4) in [-1, 1]
    a = u[:, 0] * math.radians(rotate)
    s = 1 + u[:, 1] * scale
    cos, sin = s * torch.cos(a), s * torch.sin(a)
    theta = torch.stack([torch.stack([cos, -sin, 2 * shift * u[:, 2]], 1),
                         torch.stack([sin, cos, 2 * shift * u[:, 3]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_delay(wave: Tensor, max_samples: int) -> Tensor:
    """Each clip of ``wave`` (B, S) delayed by its own ``d ~ U{0..max_samples}``: ``y[t] = x[t - d]``, 0 for ``t < d``."""
    if max_samples <= 0:
        return wave
    B, S = wave.shape
    d = torch.randint(0, max_samples + 1, (B, 1), device=wave.device)
    src = torch.arange(S, device=wave.device) - d  # (B, S)
    return torch.where(src >= 0, wave.gather(1, src.clamp(min=0)), torch.zeros((), dtype=wave.dtype))


def relative_log_mel(spec: Tensor, dynamic_range: float) -> Tensor:
    """``max(L - max_clip(L), -dynamic_range)`` of a log-mel ``L`` (B, M, N): gain-invariant, floor = silence."""
    return torch.clamp(spec - spec.amax(dim=(1, 2), keepdim=True), min=-dynamic_range)


def spec_masks(spec: Tensor, masks: int, bands: int, frames: int, fill: float) -> Tensor:
    """SpecAugment: ``masks`` frequency bands of width ``U{0..bands}`` and ``masks`` time spans of width
    ``U{0..frames}`` per clip of ``spec`` (B, M, N), each at a uniform start, set to ``fill``."""
    B, M, N = spec.shape
    hit = torch.zeros(B, M, N, dtype=torch.bool, device=spec.device)
    for size, width, dim in ((M, bands, 1), (N, frames, 2)):
        if width <= 0:
            continue
        pos = torch.arange(size, device=spec.device)
        for _ in range(masks):
            w = torch.randint(0, min(width, size) + 1, (B, 1), device=spec.device)
            start = (torch.rand(B, 1, device=spec.device) * (size - w + 1)).long()
            m = (pos >= start) & (pos < start + w)  # (B, size)
            hit |= m.unsqueeze(2) if dim == 1 else m.unsqueeze(1)
    return spec.masked_fill(hit, fill)


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
        """Create ``pos``, ``proj`` and (``summary_from='flat'``) ``flat`` after the trunk, so the parameters'
        seeded init order is fixed."""
        c = self.cfg
        self.pos = nn.Parameter(torch.zeros(c.n_positions, channels))
        self.proj = Projector(channels, d_model)
        if c.summary and c.summary_from == "flat":
            self.flat = nn.Linear((c.n_positions - 1) * channels, channels)

    def _emit(self, parts: Tensor, whole: Tensor) -> Tensor:
        """``parts`` (B, N, C) and the pooled ``whole`` (B, C) -> ``(B, N [+ 1], D)``; the summary (last) is
        ``whole`` or, with ``summary_from='flat'``, ``flat(parts flattened to (B, N C))``."""
        if not self.cfg.summary:
            return self.proj(parts + self.pos)
        if self.cfg.summary_from == "flat":
            whole = self.flat(parts.flatten(1))
        return self.proj(torch.cat([parts, whole.unsqueeze(1)], dim=1) + self.pos)

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
        c = self.cfg
        if x.shape[-2:] != (c.image_size, c.image_size):
            x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bilinear", antialias=True, align_corners=False)
        if self.training and (c.rotate or c.scale or c.shift):
            x = random_affine(x, c.rotate, c.scale, c.shift)
        return self.trunk(x * 2.0 - 1.0)

    def forward(self, images: Tensor) -> Tensor:
        f = self.features(images)  # (B, C, h, w)
        patches = F.adaptive_avg_pool2d(f, self.cfg.grid).flatten(2).transpose(1, 2)  # (B, g*g, C)
        return self._emit(patches, f.mean(dim=(2, 3)))  # (B, g*g [+ 1], D)


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
        """``(B, S)`` -> relative log-mel ``(B, n_mels, frames)`` in ``[-dynamic_range, 0]`` (augmented in training)."""
        if wave.dim() != 2:
            raise ValueError(f"AudioEncoder: expected waveforms (B, S), got shape {tuple(wave.shape)}")
        c, wave = self.cfg, wave.float()
        if self.training:
            wave = random_delay(wave, int(round(c.delay * c.sample_rate)))
        spec = relative_log_mel(log_mel(wave, self.fb, c.n_fft, c.hop), c.dynamic_range)
        if self.training and c.masks:
            spec = spec_masks(spec, c.masks, c.mask_bands, c.mask_frames, -c.dynamic_range)
        return spec

    def forward(self, wave: Tensor) -> Tensor:
        h = self.trunk(self.norm(self.spectrogram(wave)))  # (B, C, frames / 4)
        parts = F.adaptive_avg_pool1d(h, self.cfg.segments).transpose(1, 2)  # (B, N, C)
        return self._emit(parts, h.mean(dim=2))  # (B, N [+ 1], D)


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
