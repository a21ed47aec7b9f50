"""``Linear``: ``nn.Linear`` with a decode-friendly transposed weight copy.

Decoding pushes 1-16 rows through every projection, which is weight-bandwidth bound. On CPU a
row-major ``[in, out]`` weight computed as ``x @ W`` streams memory better for such skinny
products than ``nn.Linear``'s ``[out, in]`` layout (see ``bench/decode.py``, which measures both
in the same run). So :class:`Linear` keeps the usual parameter (training, checkpoints, LoRA and
``isinstance(m, nn.Linear)`` all see a plain ``nn.Linear``) and, only when autograd is off and the
input has few rows, multiplies by a cached contiguous transpose.

Cache validity: the cache is keyed on the weight's storage pointer, version counter, dtype and
device, so an optimizer step, ``load_state_dict``, ``.to()`` or a LoRA merge (all of which bump
the version or move the storage) invalidate it without any hook. ``train()`` drops it to free the
memory. Weights created under ``torch.inference_mode`` have no version counter, so they are
never cached (the plain layout is used). :func:`tied_logits` applies the same idea to a tied output head (the embedding matrix is
``[vocab, d]``, i.e. ``[out, in]``). :func:`decode_weight_cache` turns the fast path on or off
(benchmarks compare both). It is **off by default**: on the machine we measure on (2-core AMD
EPYC, torch 2.13 CPU) the cached layout decoded at 0.96-1.00x the plain one while doubling
the projection weights' memory, so it is kept only as an opt-in for machines where skinny
``[out, in]`` products are slow (``with decode_weight_cache(True): ...``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SMALL_ROWS = 16
_ENABLED = False  # opt-in: measured 0.96-1.00x on the 2-core EPYC CI machine (docs/benchmarks.md, decode)


@contextlib.contextmanager
def decode_weight_cache(enabled: bool) -> Iterator[None]:
    """Enable or disable the transposed-weight decode path inside the ``with`` block."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = prev


def _use_fast_path(x: Tensor, in_features: int) -> bool:
    return _ENABLED and not torch.is_grad_enabled() and x.numel() <= SMALL_ROWS * in_features


class TransposedCache:
    """A contiguous ``weight.T`` rebuilt whenever the weight changes (storage, version, dtype)."""

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Tensor | None = None

    def get(self, weight: Tensor) -> Tensor:
        if weight.is_inference():  # no version counter to key on (built under inference_mode): no cache
            return weight.t()
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
        if key != self.key or self.value is None:
            self.value = weight.detach().t().contiguous()  # (in, out)
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None


class Linear(nn.Linear):
    """``nn.Linear`` whose no-grad, few-row calls use a cached ``[in, out]`` weight copy."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw) -> None:
        super().__init__(in_features, out_features, bias=bias, **kw)
        self._wt = TransposedCache()

    def forward(self, x: Tensor) -> Tensor:
        if _use_fast_path(x, self.in_features):
            wt = self._wt.get(self.weight)
            if self.bias is None:
                return x @ wt
            return torch.addmm(self.bias, x.reshape(-1, self.in_features), wt).reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)

    def train(self, mode: bool = True) -> "Linear":
        if mode:
            self._wt.clear()
        return super().train(mode)


def clear_decode_cache(module: nn.Module) -> int:
    """Free every cached decode weight copy under ``module`` (e.g. before evicting an expert from
    memory); returns how many were held. They are rebuilt on the next decode call."""
    n = 0
    for m in module.modules():
        for cache in vars(m).values():
            if isinstance(cache, TransposedCache) and cache.value is not None:
                cache.clear()
                n += 1
    return n


def tied_logits(hidden: Tensor, embedding_weight: Tensor, cache: TransposedCache) -> Tensor:
    """Logits of a tied head: ``hidden (..., D) @ E^T (D, V)``, via ``cache`` when decoding."""
    if _use_fast_path(hidden, embedding_weight.shape[1]):
        return hidden @ cache.get(embedding_weight)
    return F.linear(hidden, embedding_weight)
