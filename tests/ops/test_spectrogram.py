"""Log-mel spectrogram: torch.stft form vs the plain-DFT twin, and the filterbank's hand-checkable values."""

from __future__ import annotations

import math

import pytest
import torch

from taskmoe.ops.spectrogram import hz_to_mel, log_mel, log_mel_ref, mel_filterbank, mel_to_hz


def test_log_mel_matches_dft_twin():
    fb = mel_filterbank(129, 40, 8000)
    x = torch.randn(3, 2000)
    fast, ref = log_mel(x, fb, 256, 80), log_mel_ref(x, fb, 256, 80)
    assert fast.shape == (3, 40, 1 + 2000 // 80)
    assert torch.allclose(fast, ref, atol=1e-3, rtol=1e-4)


def test_mel_scale_inverse_and_hand_value():
    # mel(700 Hz) = 2595 log10(2)
    assert float(hz_to_mel(700.0)) == pytest.approx(2595 * math.log10(2))
    f = torch.tensor([0.0, 123.0, 4000.0], dtype=torch.float64)
    assert torch.allclose(mel_to_hz(hz_to_mel(f)), f)


def test_filterbank_triangles_peak_at_their_centres():
    fb = mel_filterbank(129, 10, 8000)  # bins 31.25 Hz apart
    assert fb.shape == (10, 129) and float(fb.min()) == 0.0 and float(fb.max()) <= 1.0
    centres = mel_to_hz(torch.linspace(0, float(hz_to_mel(4000.0)), 12, dtype=torch.float64))[1:-1]
    peaks = fb.argmax(dim=1).double() * 31.25
    assert torch.all((peaks - centres).abs() <= 31.25)
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(129, 10, 8000, f_max=5000)


def test_a_tone_lights_the_band_around_its_frequency():
    sr = 8000
    fb = mel_filterbank(129, 40, sr)
    t = torch.arange(sr) / sr
    lm = log_mel(torch.sin(2 * math.pi * 1000 * t).unsqueeze(0), fb, 256, 80)  # (1, 40, N)
    band = int(lm[0].mean(dim=1).argmax())
    assert float(fb[band, round(1000 / 31.25)]) > 0.3  # the winning band covers 1 kHz
