"""The backbone encoder: pooled hidden states of a (tiny random) Llama as router vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmoe.errors import ConfigError
from taskmoe.eval.routing import nmi
from taskmoe.models.adapters import inject_adapter
from taskmoe.models.backbones import LlamaConfig, llama_lm
from taskmoe.router import Router, RouterConfig, fit_router
from taskmoe.router.encoders.backbone import BackboneEncoder, BackboneEncoderConfig, pool_hidden

from router_helpers import V, corpus


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return llama_lm(cfg).eval()


def test_pooling_is_the_masked_mean_of_the_chosen_block_and_ignores_padding():
    model = tiny_llama()
    seqs = [[30, 31, 32, 33, 34], [40, 41], [50]]
    got = pool_hidden(model, seqs, layer=2, max_length=64, batch_size=3)
    for s, row in zip(seqs, got):
        x = model.embedding(torch.tensor([s]))
        for blk in model.blocks[:2]:
            x, _ = blk(x, None)
        want = x[0, 1:].mean(0) if len(s) > 1 else x[0, 0]
        np.testing.assert_allclose(row, want.detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="deeper"):
        pool_hidden(model, seqs, layer=4, max_length=64, batch_size=3)


def test_router_on_backbone_finds_topics_and_round_trips(tmp_path):
    model = tiny_llama()
    train, labels = corpus([0, 1, 2], 40, seed=0)
    val, _ = corpus([0, 1, 2], 10, seed=1)
    cfg = RouterConfig(encoder="backbone", backbone=BackboneEncoderConfig(layer=1))
    cfg = cfg.replace(clustering=cfg.clustering.replace(n_categories=3))
    router = fit_router(train, val, cfg, vocab_size=V, backbone=model)
    assert nmi(labels, [d.selected[0] for d in router.route_batch(train)]) > 0.8
    router.save(tmp_path / "router")
    again = Router.load(tmp_path / "router")
    assert isinstance(again.encoder, BackboneEncoder)
    again.encoder.attach(model)
    np.testing.assert_allclose(again.encode(val[:5]), router.encode(val[:5]), atol=1e-6)


def test_encoder_reads_the_base_model_with_adapters_off():
    model = tiny_llama()
    enc = BackboneEncoder(BackboneEncoderConfig(layer=2), model)
    seqs, _ = corpus([0, 1], 5, seed=2)
    enc.fit(seqs)
    before = enc.encode(seqs)
    inject_adapter(model, "x", r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    np.testing.assert_allclose(enc.encode(seqs), before, atol=1e-6)


def test_missing_backbone_folder_is_a_clear_error():
    enc = BackboneEncoder(BackboneEncoderConfig(path="/nonexistent/backbone"))
    with pytest.raises(ConfigError, match="backbone folder not found"):
        enc.fit([[1, 2, 3]])
