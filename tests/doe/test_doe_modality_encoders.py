"""Modality encoders: the summary position (flat or mean), the gain-invariant log-mel, and augmentation that acts in training only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taskmoe.doe.modality.encoders import (AudioEncoder, AudioEncoderConfig, ImageEncoder, ImageEncoderConfig,
                                           random_affine, random_delay, relative_log_mel, spec_masks)
from taskmoe.errors import ConfigError
from taskmoe.ops.spectrogram import log_mel


def test_summary_is_the_last_position_flat_or_mean() -> None:
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(image_size=8, channels=8, grid=2), 16).eval()
    x = torch.rand(3, 8, 8)
    out = enc(x)
    assert out.shape == (3, 5, 16) and enc.n_positions == 5
    f = enc.features(x)
    patches = F.adaptive_avg_pool2d(f, 2).flatten(2).transpose(1, 2)  # (3, 4, 8)
    assert enc.cfg.summary_from == "flat" and enc.flat.in_features == 4 * 8  # the image default
    assert torch.allclose(out[:, -1], enc.proj(enc.flat(patches.flatten(1)) + enc.pos[-1]), atol=1e-6)
    assert torch.allclose(out[:, :-1], enc.proj(patches + enc.pos[:-1]), atol=1e-6)
    mean = ImageEncoder(ImageEncoderConfig(image_size=8, channels=8, grid=2, summary_from="mean"), 16).eval()
    assert not hasattr(mean, "flat")
    assert torch.allclose(mean(x)[:, -1], mean.proj(mean.features(x).mean(dim=(2, 3)) + mean.pos[-1]), atol=1e-6)
    plain = ImageEncoder(ImageEncoderConfig(image_size=8, channels=8, grid=2, summary=False), 16)
    assert plain(x).shape == (3, 4, 16) and not hasattr(plain, "flat")
    audio = AudioEncoder(AudioEncoderConfig(clip_seconds=0.25, channels=8, n_mels=16, segments=3), 16).eval()
    assert audio.cfg.summary_from == "mean" and audio(torch.randn(2, 2000) * 0.1).shape == (2, 4, 16)
    flat_audio = AudioEncoder(AudioEncoderConfig(clip_seconds=0.25, channels=8, n_mels=16, segments=3,
                                                 summary_from="flat"), 16).eval()
    assert flat_audio(torch.randn(2, 2000) * 0.1).shape == (2, 4, 16) and flat_audio.flat.in_features == 3 * 8
    with pytest.raises(ConfigError, match=r"ImageEncoderConfig.summary_from must be one of \['mean', 'flat'\]"):
        ImageEncoderConfig(summary_from="max")


def test_augmentation_only_in_training_and_identity_at_zero_strength() -> None:
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(image_size=8, channels=8), 16)
    x = torch.rand(4, 8, 8)
    enc.eval()
    assert torch.equal(enc(x), enc(x))
    enc.train()
    a, b = enc.features(x), enc.features(x)
    assert not torch.allclose(a, b)  # a new random affine map per call
    img = torch.rand(2, 1, 8, 8)
    assert torch.allclose(random_affine(img, 0.0, 0.0, 0.0), img, atol=1e-5)
    shifted = random_affine(img, 0.0, 0.0, 0.3)
    assert shifted.shape == img.shape and not torch.allclose(shifted, img)
    audio = AudioEncoder(AudioEncoderConfig(clip_seconds=0.25, channels=8, n_mels=16, masks=1), 16)
    w = torch.randn(2, 2000) * 0.1
    audio.eval()
    assert torch.equal(audio(w), audio(w))
    audio.train()
    assert not torch.allclose(audio.spectrogram(w), audio.spectrogram(w))


def test_random_delay_shifts_exactly_and_pads_with_silence() -> None:
    torch.manual_seed(3)
    x = torch.arange(1, 41, dtype=torch.float32).view(2, 20)
    y = random_delay(x, 5)
    for r in range(2):
        d = int((y[r] == 0).sum())
        assert 0 <= d <= 5 and torch.equal(y[r, d:], x[r, : 20 - d])
    assert torch.equal(random_delay(x, 0), x)


def test_relative_log_mel_is_gain_invariant_and_padding_is_the_floor() -> None:
    enc = AudioEncoder(AudioEncoderConfig(clip_seconds=0.5), 8)
    t = torch.arange(4000) / 8000
    word = torch.zeros(1, 4000)
    word[0, :2000] = 0.3 * torch.sin(2 * torch.pi * 440 * t[:2000])
    spec = lambda w: relative_log_mel(log_mel(w, enc.fb, 256, 80), 8.0)  # noqa: E731
    loud, quiet = spec(word), spec(word * 0.05)
    assert float(loud.max()) == 0.0 and float(loud.min()) == -8.0
    assert torch.allclose(loud, quiet, atol=1e-2)  # up to the log floor eps of log_mel
    assert bool((loud[0, :, -10:] == -8.0).all())  # the zero padding sits exactly at the floor


def test_spec_masks_cover_at_most_the_width_and_fill() -> None:
    torch.manual_seed(0)
    s = torch.zeros(8, 16, 40)
    m = spec_masks(s, 1, 4, 6, fill=-8.0)
    hit = m == -8.0
    bands = hit.all(dim=2).sum(dim=1)  # fully masked bands per clip
    frames = hit.all(dim=1).sum(dim=1)  # fully masked frames per clip
    assert bool((bands <= 4).all()) and bool((frames <= 6).all()) and bool(hit.any())
    assert torch.equal(spec_masks(s, 0, 4, 6, fill=-8.0), s)
