"""Causal softmax attention (PyTorch SDPA) with rotary positions and a KV cache, in two projection layouts.

Per head (d = head_dim; H query heads, G key/value heads, H a multiple of G)::

    q, k, v = proj(x)                          # q (B, H, T, d), k and v (B, G, T, d)
    q, k    = rope(q, pos), rope(k, pos)       # see taskmoe.layers.rope
    o       = softmax(q k^T / sqrt(d) + causal mask) v   # query head h reads kv head h // (H / G)
    y       = out(o)

- :class:`Attention`: one fused ``qkv`` projection, G = H (the from-scratch transformer and DOE base).
- :class:`GQAttention`: grouped-query attention with separate ``q_proj``/``k_proj``/``v_proj``/
  ``o_proj`` (Hugging Face Llama's names and layout, so a converted checkpoint and a PEFT adapter
  map onto it name for name), G <= H, any head size.
  ``qkv_bias``/``o_bias`` add biases (Qwen2: q/k/v; Llama ``attention_bias``: all four).
  Grouped heads are never copied: SDPA's ``enable_gqa`` reads each kv head for its query group.

Both share :func:`cached_attention`, the position/cache/mask logic. KV cache (:class:`KVCache`):
preallocated ``(B, G, capacity, d)`` buffers that grow by doubling, and per-row ``lengths`` so one
batch can hold prompts of different lengths (generation prefills length groups separately and
concatenates their caches). Row ``b``'s new keys are written at positions ``lengths[b] + t``; a
query at position ``p`` sees exactly the keys at ``<= p``, so slots past a row's length (padding
left by a shorter row) are masked out exactly. When all rows have the same length (the common
case) the cache is sliced and no mask is built for single-token steps.

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

from taskmoe.layers.rope import RopeScaling, rope, rope_inv_freq
from taskmoe.layers.state import TensorState

__all__ = ["KVCache", "empty_cache", "cached_attention", "Attention", "GQAttention", "rope"]

_GROW = 64


@dataclass
class KVCache(TensorState):
    k: Tensor  # (B, G, capacity, d), keys after rotary embedding (G = key/value heads)
    v: Tensor  # (B, G, capacity, d)
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


def empty_cache(batch_size: int, n_heads: int, head_dim: int, device, dtype) -> KVCache:
    """A cache holding nothing yet: (B, n_heads, 0, head_dim) buffers, lengths 0."""
    empty = torch.zeros(batch_size, n_heads, 0, head_dim, device=device, dtype=dtype)
    return KVCache(empty, empty.clone(), torch.zeros(batch_size, dtype=torch.long, device=device))


def cached_attention(q: Tensor, k: Tensor, v: Tensor, state: KVCache | None,
                     inv_freq: Tensor) -> tuple[Tensor, KVCache | None]:
    """Rotate, cache and attend: q (B, H, T, d), k/v (B, G, T, d) before RoPE -> o (B, T, H * d), cache.

    ``state=None`` is the stateless causal pass (positions 0..T-1, nothing cached).
    """
    B, H, T, d = q.shape
    gqa = k.shape[1] != H
    if state is None:
        pos = torch.arange(T, device=q.device)
        q, k = rope(q, pos, inv_freq), rope(k, pos, inv_freq)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return o.transpose(1, 2).reshape(B, T, H * d), None
    lo, hi = (int(t) for t in torch.aminmax(state.lengths)) if B else (0, 0)
    uniform = lo == hi
    steps = torch.arange(T, device=q.device)
    pos = steps + lo if uniform else state.lengths.unsqueeze(1) + steps  # (T,) or (B, T)
    q, k = rope(q, pos, inv_freq), rope(k, pos, inv_freq)
    kbuf, vbuf = state.reserve(hi + T, hi)
    if uniform:
        kbuf[:, :, lo : lo + T] = k
        vbuf[:, :, lo : lo + T] = v
    else:
        rows = torch.arange(B, device=q.device).unsqueeze(1)  # (B, 1)
        kbuf[rows, :, pos] = k.transpose(1, 2)  # (B, T, G, d) at (row, pos)
        vbuf[rows, :, pos] = v.transpose(1, 2)
    L = hi + T
    if uniform and lo == 0:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif uniform and T == 1:
        o = F.scaled_dot_product_attention(q, kbuf[:, :, :L], vbuf[:, :, :L], enable_gqa=gqa)
    else:
        mask = torch.arange(L, device=q.device) <= pos.unsqueeze(-1)  # (T, L) or (B, T, L)
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)  # (B, 1, T, L)
        o = F.scaled_dot_product_attention(q, kbuf[:, :, :L], vbuf[:, :, :L], attn_mask=mask, enable_gqa=gqa)
    return o.transpose(1, 2).reshape(B, T, H * d), KVCache(kbuf, vbuf, state.lengths + T)


class Attention(nn.Module):
    """Multi-head attention with one fused ``qkv`` projection (H = G)."""

    def __init__(self, d_model: int, n_heads: int, *, rope_base: float = 10000.0) -> None:
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"Attention: d_model {d_model} must split into {n_heads} heads of even size")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj.residual_out = True
        self.register_buffer("inv_freq", rope_inv_freq(self.head_dim, rope_base), persistent=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        w = self.qkv.weight
        return empty_cache(batch_size, self.n_heads, self.head_dim, device or w.device, dtype or w.dtype)

    def forward(self, x: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).transpose(1, 3).unbind(2)  # (B, H, T, d)
        o, new = cached_attention(q, k, v, state, self.inv_freq)
        return self.out_proj(o), new


class GQAttention(nn.Module):
    """Grouped-query attention with Hugging Face Llama's separate projections (see the module docstring)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, rope_theta: float = 10000.0,
                 rope_scaling: RopeScaling | None = None, qkv_bias: bool = False, o_bias: bool = False) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"GQAttention: {n_heads} query heads must be a multiple of {n_kv_heads} key/value heads")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=o_bias)
        self.o_proj.residual_out = True
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope_theta, rope_scaling), persistent=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        w = getattr(self.k_proj, "weight", None)  # None once quantized (Int4Linear): default to float32
        device = device or (w.device if w is not None else self.inv_freq.device)
        dtype = dtype or (w.dtype if w is not None else torch.float32)
        return empty_cache(batch_size, self.n_kv_heads, self.head_dim, device, dtype)

    def forward(self, x: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache | None]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, d)
        o, new = cached_attention(q, k, v, state, self.inv_freq)
        return self.o_proj(o), new
