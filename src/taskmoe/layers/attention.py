"""``Attention``: causal multi-head softmax attention (PyTorch SDPA) with rotary positions and a KV cache.

Per head (d = head_dim)::

    q, k, v = split(qkv(x))                    # (B, H, T, d)
    q, k    = rope(q, pos), rope(k, pos)       # rotate pairs (i, i + d/2) by pos * base**(-2i/d)
    o       = softmax(q k^T / sqrt(d) + causal mask) v
    y       = out(o)

KV cache (:class:`KVCache`): preallocated ``(B, H, capacity, d)`` buffers that grow by doubling, and
per-row ``lengths`` so one batch can hold prompts of different lengths (generation prefills length
groups separately and concatenates their caches). Row ``b``'s new keys are written at positions
``lengths[b] + t``; a query at position ``p`` sees exactly the keys at ``<= p``, so slots past a
row's length (padding left by a shorter row) are masked out exactly. When all rows have the same
length (the common case) the cache is sliced and no mask is built for single-token steps.

A step writes into the shared buffer and returns a new ``KVCache`` whose ``lengths`` cover the
new tokens; the previous cache object stays valid for its own (shorter) lengths, but branching
twice from one cache needs ``cache.clone()`` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.layers.state import TensorState

_GROW = 64


def rope(x: Tensor, pos: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotary embedding of ``x`` (B, H, T, d) at positions ``pos`` (T,) or (B, T).

    ``out[..., i] = x_i cos(p w_i) - x_{i+d/2} sin(p w_i)``, ``out[..., i+d/2] = x_i sin + x_{i+d/2} cos``.
    """
    ang = pos.to(inv_freq.dtype).unsqueeze(-1) * inv_freq  # (T, d/2) or (B, T, d/2)
    if ang.dim() == 3:
        ang = ang.unsqueeze(1)  # (B, 1, T, d/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@dataclass
class KVCache(TensorState):
    k: Tensor  # (B, H, capacity, d), keys after rotary embedding
    v: Tensor  # (B, H, capacity, d)
    lengths: Tensor  # (B,) int64: tokens cached per row

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, needed: int, used: int) -> tuple[Tensor, Tensor]:
        """Buffers with room for ``needed`` positions (the first ``used`` are copied on growth)."""
        if needed <= self.capacity:
            return self.k, self.v
        cap = max(needed, 2 * self.capacity)
        cap = _GROW * -(-cap // _GROW)
        B, H, _, d = self.k.shape
        k = self.k.new_zeros(B, H, cap, d)
        v = self.v.new_zeros(B, H, cap, d)
        k[:, :, :used] = self.k[:, :, :used]
        v[:, :, :used] = self.v[:, :, :used]
        return k, v

    @classmethod
    def cat(cls, states: Sequence["KVCache"]) -> "KVCache":
        cap = max(s.capacity for s in states)
        pad = lambda t: F.pad(t, (0, 0, 0, cap - t.shape[2]))  # noqa: E731 - pad the time axis
        return cls(torch.cat([pad(s.k) for s in states]), torch.cat([pad(s.v) for s in states]),
                   torch.cat([s.lengths for s in states]))


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, *, rope_base: float = 10000.0) -> None:
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"Attention: d_model {d_model} must split into {n_heads} heads of even size")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj.residual_out = True
        inv_freq = rope_base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        w = self.qkv.weight
        device, dtype = device or w.device, dtype or w.dtype
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone(), torch.zeros(batch_size, dtype=torch.long, device=device))

    def forward(self, x: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).transpose(1, 3).unbind(2)  # (B, H, T, d)
        if state is None:
            pos = torch.arange(T, device=x.device)
            q, k = rope(q, pos, self.inv_freq), rope(k, pos, self.inv_freq)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out_proj(o.transpose(1, 2).reshape(B, T, D)), None
        lo, hi = (int(t) for t in torch.aminmax(state.lengths)) if B else (0, 0)
        uniform = lo == hi
        steps = torch.arange(T, device=x.device)
        pos = steps + lo if uniform else state.lengths.unsqueeze(1) + steps  # (T,) or (B, T)
        q, k = rope(q, pos, self.inv_freq), rope(k, pos, self.inv_freq)
        kbuf, vbuf = state.reserve(hi + T, hi)
        if uniform:
            kbuf[:, :, lo : lo + T] = k
            vbuf[:, :, lo : lo + T] = v
        else:
            rows = torch.arange(B, device=x.device).unsqueeze(1)  # (B, 1)
            kbuf[rows, :, pos] = k.transpose(1, 2)  # (B, T, H, d) at (row, pos)
            vbuf[rows, :, pos] = v.transpose(1, 2)
        L = hi + T
        if uniform and lo == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif uniform and T == 1:
            o = F.scaled_dot_product_attention(q, kbuf[:, :, :L], vbuf[:, :, :L])
        else:
            mask = torch.arange(L, device=x.device) <= pos.unsqueeze(-1)  # (T, L) or (B, T, L)
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)  # (B, 1, T, L)
            o = F.scaled_dot_product_attention(q, kbuf[:, :, :L], vbuf[:, :, :L], attn_mask=mask)
        y = self.out_proj(o.transpose(1, 2).reshape(B, T, D))
        return y, KVCache(kbuf, vbuf, state.lengths + T)
