"""Causal linear attention with an optional per-head scalar decay (RetNet / GLA-style).

Glossary (layout ``(B, T, H, D)``, the same as ``fla``):

- ``q``, ``k`` (B, T, H, Dk): queries and keys *after* the feature map and any scaling (the op
  applies neither, so elu+1, identity, or anything else is the caller's choice).
- ``v`` (B, T, H, Dv): values.
- ``g`` (B, T, H): natural-log decay per head and step, ``g <= 0`` (``gamma_t = exp(g_t)``); None
  means no decay (plain kernelized linear attention, ``gamma = 1``). A constant per-head ``g``
  gives RetNet's retention; a data-dependent one gives a GLA / Mamba-2-style scalar gate.
- ``S`` (B, H, Dk, Dv): the recurrent state, a sum of decayed outer products ``k v^T``.

Formula (the output at step t includes step t)::

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T
    o_t = q_t^T S_t

A normalized (Katharopoulos) form ``o_t = q_t^T S_t / q_t^T z_t`` with ``z_t = sum k`` needs no
op of its own: append a column of ones to ``v`` and divide by the last output column (the layer
:class:`taskmoe.layers.LinearAttention` does this).

Forms:

- :func:`linear_attention` — chunked-parallel (training/prefill). Within a chunk of ``L`` steps the
  output is a masked ``(L, L)`` attention ``(q k^T * D) v`` with ``D_ij = exp(b_i - b_j)`` for
  ``j <= i`` (``b`` the in-chunk cumulative log decay); across chunks only the ``(Dk, Dv)`` state is
  carried: ``o_i += exp(b_i) q_i^T S_in`` and ``S_out = exp(b_L) S_in + sum_j exp(b_L - b_j) k_j v_j^T``.
  Every exponent is a difference ``b_i - b_j <= 0`` taken after masking, so nothing overflows. T need
  not be a multiple of L (the tail is zero-padded: a zero key adds nothing and ``g = 0`` keeps the
  state). Uses ``fla-core`` on CUDA when importable, a carried-in state included (prefill).
- :func:`linear_attention_step` — one decoding step with the ``(Dk, Dv)`` state (O(1) in context).
- :func:`linear_attention_ref` — the recurrence as a plain loop over time (the test reference).

All return ``(o, final_state)``, so chunked prefill then recurrent steps equals one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from taskmoe.ops import kernels


def _init_state(q: Tensor, v: Tensor, state: Tensor | None) -> Tensor:
    B, H, Dk, Dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    if state is None:
        return q.new_zeros(B, H, Dk, Dv)
    if state.shape != (B, H, Dk, Dv):
        raise ValueError(f"linear_attention: state has shape {tuple(state.shape)}, expected {(B, H, Dk, Dv)}")
    return state


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked-parallel form: ``(o (B, T, H, Dv), S (B, H, Dk, Dv))``; see the module docstring."""
    fused = kernels.kernel("simple_gla", q, k, v, g, state)
    if fused is not None:  # fla's layout is ours, (B, T, H, K): no transpose and no head_first flag (removed in fla 0.5)
        o, S = fused(q, k, v, g=g, scale=1.0, initial_state=state, output_final_state=True)
        return o, S.to(q.dtype)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    S = _init_state(q, v, state)
    L = max(1, min(chunk_size, T))
    N = math.ceil(T / L) if T else 0
    pad = N * L - T
    # (B, T, H, D) -> (B, H, N, L, D), zero-padding the tail of the time axis
    qc, kc, vc = (F.pad(t.transpose(1, 2), (0, 0, 0, pad)).reshape(B, H, N, L, -1) for t in (q, k, v))
    scores = qc @ kc.transpose(-1, -2)  # (B, H, N, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    if g is None:
        o_intra = scores.masked_fill(~causal, 0.0) @ vc  # (B, H, N, L, Dv)
        kv = kc.transpose(-1, -2) @ vc  # (B, H, N, Dk, Dv): each chunk's contribution
        # state entering chunk n = S0 + sum_{m<n} kv_m (exclusive cumulative sum)
        s_in = S.unsqueeze(2) + (kv.cumsum(2) - kv)  # (B, H, N, Dk, Dv)
        o = o_intra + qc @ s_in
        S_out = S + kv.sum(2)
    else:
        b = F.pad(g.transpose(1, 2), (0, pad)).reshape(B, H, N, L).cumsum(-1)  # (B, H, N, L), <= 0
        diff = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~causal, float("-inf"))  # (B,H,N,L,L)
        o_intra = (scores * diff.exp()) @ vc
        last = b[..., -1:]  # (B, H, N, 1): log decay across the whole chunk
        kv = (kc * (last - b).exp().unsqueeze(-1)).transpose(-1, -2) @ vc  # (B, H, N, Dk, Dv)
        chunk_decay = last.exp().unsqueeze(-1)  # (B, H, N, 1, 1)
        states = []
        for n in range(N):  # N = T / L steps over (Dk, Dv) states
            states.append(S)
            S = chunk_decay[:, :, n] * S + kv[:, :, n]
        S_out = S
        s_in = torch.stack(states, dim=2) if states else kv  # (B, H, N, Dk, Dv)
        o = o_intra + (qc * b.exp().unsqueeze(-1)) @ s_in
    o = o.reshape(B, H, N * L, Dv)[:, :, :T].transpose(1, 2)  # (B, T, H, Dv)
    return o, S_out


def linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step: ``q``, ``k`` (B, H, Dk), ``v`` (B, H, Dv), ``g`` (B, H) -> ``(o (B, H, Dv), S)``."""
    S = _init_state(q, v, state)
    if g is not None:
        S = S * g.exp()[..., None, None]
    S = S + k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, Dk, Dv)
    o = (q.unsqueeze(-2) @ S).squeeze(-2)  # (B, H, Dv)
    return o, S


def linear_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference twin: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T; o_t = q_t^T S_t`` as a loop."""
    S = _init_state(q, v, state)
    outs = []
    for t in range(q.shape[1]):
        if g is not None:
            S = torch.exp(g[:, t])[:, :, None, None] * S
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, S
