"""Experts around the shared embedding: frozen by default, fine-tuned on request, saved without the
shared table, loaded around it, and held lazily by the ExpertStore (16 registered, 2 resident)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.experts.expert_lm import build_expert, expert_config, load_expert, open_store, owns_embedding, save_expert
from taskmoe.experts.store import module_nbytes
from taskmoe.io import load_tensors
from taskmoe.models.config import ConvConfig, ExpertLMConfig, LinearAttentionConfig
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train

V, D = 50, 16


def _cfg(shared: nn.Embedding, **kw) -> ExpertLMConfig:
    return expert_config(shared, ExpertLMConfig(n_layers=2, n_heads=2, conv=ConvConfig(levels=2),
                                                attention=LinearAttentionConfig(chunk_size=8)), **kw)


def _steps(model: nn.Module, n: int = 3) -> None:
    data = [torch.randint(0, V, (9,)) for _ in range(8)]

    def loss(m, batch):
        logits = m(batch[:, :-1]).logits
        return nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1)), {}

    train(model, loss, data, TrainConfig(max_steps=n, batch_size=4, lr=1e-2, warmup_steps=0, progress=False))


def test_config_takes_table_dims() -> None:
    shared = nn.Embedding(V, D)
    cfg = _cfg(shared)
    assert (cfg.vocab_size, cfg.d_model) == (V, D)
    with pytest.raises(ConfigError, match="disagrees with the shared embedding"):
        _cfg(shared, d_model=32)


def test_frozen_shared_table_is_not_trained_and_not_saved(tmp_path: Path) -> None:
    shared = nn.Embedding(V, D)
    before = shared.weight.detach().clone()
    model = build_expert(_cfg(shared), shared)
    assert model.embedding is shared and not owns_embedding(model, shared)
    blocks_before = {k: v.clone() for k, v in model.blocks.state_dict().items()}
    _steps(model)
    assert torch.equal(shared.weight, before)  # the router's table never moves
    assert any(not torch.equal(v, model.blocks.state_dict()[k]) for k, v in blocks_before.items())  # the expert did
    save_expert(model, tmp_path / "e", shared)
    assert "embedding.weight" not in load_tensors(tmp_path / "e" / "model.safetensors")
    loaded = load_expert(tmp_path / "e", shared).eval()
    assert loaded.embedding is shared
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_fine_tuned_table_is_a_copy_and_saved_with_the_expert(tmp_path: Path) -> None:
    shared = nn.Embedding(V, D)
    before = shared.weight.detach().clone()
    model = build_expert(_cfg(shared), shared, fine_tune_embedding=True)
    assert owns_embedding(model, shared) and torch.equal(model.embedding.weight, before)
    _steps(model)
    assert torch.equal(shared.weight, before)  # only the expert's copy is trained
    assert not torch.equal(model.embedding.weight, before)
    save_expert(model, tmp_path / "e", shared)
    assert "embedding.weight" in load_tensors(tmp_path / "e" / "model.safetensors")
    loaded = load_expert(tmp_path / "e", shared).eval()
    assert loaded.embedding is not shared
    torch.testing.assert_close(loaded.embedding.weight, model.embedding.weight, rtol=0, atol=0)


def test_table_mismatch_names_the_file(tmp_path: Path) -> None:
    shared = nn.Embedding(V, D)
    save_expert(build_expert(_cfg(shared), shared), tmp_path / "e", shared)
    with pytest.raises(CheckpointError, match=r"e/config\.json.*50 x 16.*shared table is 60 x 16"):
        load_expert(tmp_path / "e", nn.Embedding(60, D))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_store_of_16_real_experts_holds_the_2_used(tmp_path: Path) -> None:
    """16 expert_lm folders registered, 2 used: the store loads 2, charges 2 experts' bytes (the
    shared table is charged to none), and resident memory grows by about 2 experts, not 16."""
    shared = nn.Embedding(512, 128)
    model = build_expert(expert_config(shared, ExpertLMConfig(n_layers=2, n_heads=4, conv=ConvConfig(levels=2))), shared)
    per_expert = module_nbytes(model, [shared.weight.untyped_storage().data_ptr()])
    assert per_expert > 1 << 20
    for i in range(16):
        save_expert(model, tmp_path / f"e{i:02d}", shared)
    del model
    store = open_store(tmp_path, shared)
    assert len(store.names) == 16 and store.stats().loads == 0
    before = _rss_bytes()
    a, b = store.get("e03"), store.get("e11")
    grown = _rss_bytes() - before
    s = store.stats()
    assert (s.loads, s.resident) == (2, ["e03", "e11"])
    assert s.resident_bytes == 2 * per_expert
    assert a.embedding is shared and b.embedding is shared
    assert grown < 4 * per_expert, f"RSS grew by {grown / 2**20:.1f} MiB for 2 experts of {per_expert / 2**20:.1f} MiB"
