"""Dilated depthwise causal 1-D convolution over time, optionally gated.

Glossary (shapes are batch-first, time-major like the rest of taskmoe):

- ``x`` (B, T, C): input sequence, C channels convolved independently (depthwise).
- ``weight`` (C, K): one K-tap filter per channel; tap ``K-1`` sees the current step.
- ``d``: dilation; the filter reaches back ``W = (K - 1) * d`` steps.
- ``state`` (B, C, W): the last W inputs seen, oldest first (zeros = an empty history).
- ``gate`` (B, T, C): optional; the output is multiplied by ``silu(gate)``.

Formula::

    y_t[c] = bias[c] + sum_{j=0}^{K-1} weight[c, j] * x_{t - (K-1-j) d}[c]      (x_{<0} from state)
    y_t    = y_t * silu(gate_t)                                                (if gated)

Three forms with one contract:

- :func:`causal_conv` — the full-sequence form (one ``F.conv1d`` over ``[state, x]``).
- :func:`causal_conv_step` — one new time step; the state is a rolling buffer of the last W
  inputs (shift left, append), so decoding costs O(C K) per token whatever the context length.
- :func:`causal_conv_ref` — the plain double loop the other two are tested against.

All three return ``(y, new_state)``, so a prefill with :func:`causal_conv` followed by any number
of :func:`causal_conv_step` calls equals one call on the concatenated sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _history(x: Tensor, weight: Tensor, dilation: int, state: Tensor | None) -> Tensor:
    B, C = x.shape[0], x.shape[-1]
    W = (weight.shape[1] - 1) * dilation
    if state is None:
        return x.new_zeros(B, C, W)
    if state.shape != (B, C, W):
        raise ValueError(f"causal_conv: state has shape {tuple(state.shape)}, expected {(B, C, W)}")
    return state


def causal_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    dilation: int = 1,
    gate: Tensor | None = None,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Full-sequence dilated depthwise causal convolution; returns ``(y (B,T,C), state (B,C,W))``."""
    B, T, C = x.shape
    W = (weight.shape[1] - 1) * dilation
    hist = _history(x, weight, dilation, state)
    xp = torch.cat([hist, x.transpose(1, 2)], dim=2)  # (B, C, W + T)
    y = F.conv1d(xp, weight.unsqueeze(1), bias, dilation=dilation, groups=C)  # (B, C, T)
    y = y.transpose(1, 2)  # (B, T, C)
    if gate is not None:
        y = y * F.silu(gate)
    return y, xp[:, :, xp.shape[2] - W :]


def causal_conv_step(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    dilation: int = 1,
    gate: Tensor | None = None,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One time step: ``x`` (B, C) -> ``(y (B, C), state (B, C, W))`` via a rolling buffer."""
    hist = _history(x, weight, dilation, state)
    buf = torch.cat([hist, x.unsqueeze(-1)], dim=-1)  # (B, C, W + 1), oldest first
    taps = buf[:, :, ::dilation]  # (B, C, K): x_{t-(K-1)d}, ..., x_t
    y = (taps * weight).sum(-1)  # (B, C)
    if bias is not None:
        y = y + bias
    if gate is not None:
        y = y * F.silu(gate)
    return y, buf[:, :, 1:]


def causal_conv_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    dilation: int = 1,
    gate: Tensor | None = None,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference twin: the formula as a loop over time steps and taps."""
    B, T, C = x.shape
    K = weight.shape[1]
    W = (K - 1) * dilation
    hist = _history(x, weight, dilation, state)
    seq = torch.cat([hist.transpose(1, 2), x], dim=1)  # (B, W + T, C)
    ys = []
    for t in range(T):
        acc = x.new_zeros(B, C) if bias is None else bias.expand(B, C)
        for j in range(K):
            acc = acc + weight[:, j] * seq[:, W + t - (K - 1 - j) * dilation]
        if gate is not None:
            acc = acc * F.silu(gate[:, t])
        ys.append(acc)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, C)
    return y, seq[:, seq.shape[1] - W :].transpose(1, 2)
