"""Tiny real experts (``expert_lm``) for the cross-talk tests: built in milliseconds, untrained
(their random distributions are all the dialogue and GAN contracts need)."""

from __future__ import annotations

import torch

from taskmoe.crosstalk.dialogue import Speaker
from taskmoe.models import ConvConfig, ExpertLMConfig, LinearAttentionConfig, expert_lm
from taskmoe.layers.lora import inject, lora_layers, set_adapter

V = 48


def tiny_expert(seed: int, vocab: int = V, embedding: torch.nn.Embedding | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ExpertLMConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=2, conv=ConvConfig(levels=2),
                         attention=LinearAttentionConfig(chunk_size=8))
    return expert_lm(cfg, embedding).eval()


def with_adapter(model: torch.nn.Module, name: str = "crosstalk", scale: float = 0.5, seed: int = 0) -> torch.nn.Module:
    """Inject adapter ``name`` with a non-zero B (so it visibly changes outputs), switched off."""
    inject(model, ["out_proj", "down"], rank=4, alpha=8.0, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B[name]
            b.copy_(torch.randn(b.shape, generator=g) * scale)
    set_adapter(model, None)
    return model


def pair(adapters: bool = False) -> list[Speaker]:
    a, b = tiny_expert(1), tiny_expert(2)
    if adapters:
        with_adapter(a, seed=1)
        with_adapter(b, seed=2)
    name = "crosstalk" if adapters else None
    return [Speaker("law", a, name), Speaker("poet", b, name)]
