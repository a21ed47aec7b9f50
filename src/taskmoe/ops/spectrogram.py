"""Log-mel spectrograms: the mel filterbank, the fast ``torch.stft`` form and its plain-DFT twin.

Glossary:

- ``x``      (B, S)        waveforms at ``sr`` Hz
- ``n_fft``, ``hop``       frame length and step in samples; frames are Hann-windowed, centred
                           (``x`` is reflect-padded by ``n_fft // 2`` on both sides)
- ``F = n_fft // 2 + 1``   one-sided frequency bins, bin ``k`` at ``k * sr / n_fft`` Hz
- ``M``                    mel bands; ``mel(f) = 2595 log10(1 + f / 700)`` (HTK)
- ``fb``     (M, F)        triangular filters, band ``m`` rising from ``c_{m-1}`` to a peak of 1
                           at ``c_m`` and falling to ``c_{m+1}``, centres ``c_0..c_{M+1}`` equally
                           spaced in mel between ``f_min`` and ``f_max``
- output     (B, M, N)     ``log(fb @ |STFT(x)|^2 + eps)``, ``N = 1 + S // hop`` frames

No torchaudio: its wheels pin a torch version, and the few lines here are the whole feature.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_EPS = 1e-6


def hz_to_mel(f: Tensor | float) -> Tensor:
    """``mel = 2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    """Inverse of :func:`hz_to_mel`: ``f = 700 (10^(m / 2595) - 1)``."""
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """Triangular mel filters ``(n_mels, n_freqs)`` float32 over bins ``k * sr / (2 (n_freqs - 1))`` Hz."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel_filterbank: need 0 <= f_min < f_max <= sr / 2, got {f_min}, {f_max}, sr={sample_rate}")
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)  # (F,)
    centres = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64))
    lo, mid, hi = centres[:-2, None], centres[1:-1, None], centres[2:, None]  # (M, 1) each
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()  # (M, F)


def log_mel(x: Tensor, fb: Tensor, n_fft: int, hop: int) -> Tensor:
    """``log(fb @ |STFT(x)|^2 + eps)``: (B, S) -> (B, M, N), via ``torch.stft``."""
    window = torch.hann_window(n_fft, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(x, n_fft, hop_length=hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec.real.square() + spec.imag.square()  # (B, F, N)
    return torch.log(torch.einsum("mf,bfn->bmn", fb.to(x.dtype), power) + LOG_EPS)


def log_mel_ref(x: Tensor, fb: Tensor, n_fft: int, hop: int) -> Tensor:
    """Twin of :func:`log_mel`: explicit framing and a DFT matrix, one frame at a time."""
    B, S = x.shape
    pad = n_fft // 2
    xp = torch.nn.functional.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)  # (B, S + 2 pad)
    n = torch.arange(n_fft, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)  # periodic Hann
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    ang = 2 * math.pi * k[:, None] * n[None] / n_fft  # (F, n_fft)
    cos, sin = torch.cos(ang), torch.sin(ang)
    frames = []
    for start in range(0, xp.shape[1] - n_fft + 1, hop):
        seg = xp[:, start : start + n_fft].double() * window  # (B, n_fft)
        re, im = seg @ cos.T, -(seg @ sin.T)  # (B, F)
        frames.append(re.square() + im.square())
    power = torch.stack(frames, dim=2)  # (B, F, N)
    return torch.log(torch.einsum("mf,bfn->bmn", fb.double(), power) + LOG_EPS).to(x.dtype)
