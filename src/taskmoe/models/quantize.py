"""Weight-only quantization of a whole ``CausalLM`` for inference (``weights="int4"``).

:func:`quantize_lm` turns every projection of every block into a 4-bit
:class:`~taskmoe.layers.quant.Int4Linear` (group-wise, GGUF ``Q4_1``'s grid; LoRA experts stay
float32 on top) and gives the output head the precision ``head`` names:

- ``"int8"`` (default): per-row int8 (a quarter of float32's bytes; SmolLM2's head ships as GGUF
  ``Q8_0``); the input embedding stays float32.
- ``"bf16"``: a bfloat16 copy of the (tied) head, half of float32's bytes.
- ``"int4"``: the head quantized like the blocks (an eighth of the bytes, the most lossy).
- ``"fp32"``: the head untouched.

Batch-1 decoding reads every weight once per token, so it is bound by weight bytes: for
SmolLM2-135M that is 538 MB per token in float32 and about 95 MB here (4-bit blocks, int8 head).
Prefill is compute-bound instead, so by default each quantized layer also keeps a bfloat16 copy of
its 4-bit values for inputs of many rows (``prefill="bf16"``; memory: 0.5 + 2 bytes per weight,
still below float32's 4). Embeddings, norms, the
residual stream and the KV cache stay float32; each quantized matmul rounds its input to bfloat16.
The model is for inference only (no float weights, no gradients); :data:`WEIGHT_FORMATS` names
the accepted formats for ``taskmoe.load(..., weights=...)`` and the ``--weights`` flags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.errors import ConfigError
from taskmoe.layers.quant import Int4Linear, Int8Linear, quantize_linears

__all__ = ["quantize_lm", "WEIGHT_FORMATS", "HEAD_FORMATS", "BF16Head", "apply_weight_format", "check_weight_format"]

WEIGHT_FORMATS = ("fp32", "int4")
HEAD_FORMATS = ("int8", "bf16", "int4", "fp32")


class BF16Head(nn.Module):
    """A bfloat16 copy of a head weight (V, D): ``logits = (h in bf16) W^T``, returned as float32."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_bf16", weight.detach().to(torch.bfloat16).contiguous())

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden.to(torch.bfloat16), self.weight_bf16).to(hidden.dtype)


def quantize_lm(model: nn.Module, *, group_size: int = 32, head: str = "int8", prefill: str = "bf16") -> list[str]:
    """Quantize ``model``'s block projections to int4 in place and set the head's precision; return the names changed.

    ``model`` is a :class:`~taskmoe.models.CausalLM` (anything with ``blocks``, ``embedding``, ``lm_head``).
    ``prefill="bf16"`` (default) keeps a bfloat16 copy of each quantized weight for inputs of many rows
    (prefill, large batches); ``"int4"`` runs every input through the int4 kernel (the least memory).
    The model is put in eval mode; calling it again is a no-op for layers already quantized.
    """
    if prefill not in ("bf16", "int4"):
        raise ConfigError(f"prefill format must be 'bf16' or 'int4', got {prefill!r}")
    if head not in HEAD_FORMATS:
        raise ConfigError(f"head format must be one of {HEAD_FORMATS}, got {head!r}")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"quantize_lm needs a CausalLM-like model with blocks, got {type(model).__name__}")
    model.eval()
    done = [f"blocks.{n}" for n in quantize_linears(blocks, group_size, dense=prefill == "bf16")]
    if head != "fp32" and not isinstance(model.lm_head, (BF16Head, Int4Linear, Int8Linear)):
        w = model.embedding.weight if model.lm_head is None else model.lm_head.weight
        if head == "int8":
            model.lm_head = Int8Linear(w)
        elif head == "bf16":
            model.lm_head = BF16Head(w)
        else:
            model.lm_head = Int4Linear.from_weight(w, None, group_size)
        done.append("lm_head")
    model.requires_grad_(False)
    return done


def check_weight_format(weights: str) -> str:
    """``weights`` itself when it is one of :data:`WEIGHT_FORMATS` (ConfigError otherwise; call it before loading)."""
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    return weights


def apply_weight_format(model: nn.Module, weights: str) -> nn.Module:
    """``weights="fp32"``: ``model`` as is; ``"int4"``: :func:`quantize_lm` with the defaults."""
    if check_weight_format(weights) == "int4":
        quantize_lm(model)
    return model
