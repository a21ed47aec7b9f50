"""save_lm / load_lm round trip, shared embeddings, and errors that name the file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.layers import SwiGLU
from taskmoe.models import LMConfig, expert_lm, load_lm, save_lm, summarizer_lm, transformer_lm

CFG = LMConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, chunk_size=4)


@pytest.mark.parametrize("builder", [expert_lm, summarizer_lm, transformer_lm], ids=lambda b: b.__name__)
def test_round_trip(tmp_path, builder) -> None:
    model = builder(CFG).eval()
    save_lm(model, tmp_path / "m", kind="expert", meta={"domain": "legal"})
    loaded = load_lm(tmp_path / "m", kind="expert").eval()
    assert loaded.builder == builder.__name__ and loaded.config == CFG
    ids = torch.randint(0, 41, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_vocab_mismatch_names_file(tmp_path) -> None:
    save_lm(expert_lm(CFG), tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    text = cfg_file.read_text().replace('"vocab_size": 41', '"vocab_size": 50')
    cfg_file.write_text(text)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*vocabulary size mismatch"):
        load_lm(tmp_path / "m")


def test_wrong_kind_and_bad_builder(tmp_path) -> None:
    save_lm(expert_lm(CFG), tmp_path / "m", kind="expert")
    with pytest.raises(CheckpointError, match="expected 'summarizer'"):
        load_lm(tmp_path / "m", kind="summarizer")
    cfg_file = tmp_path / "m" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"expert_lm"', '"gpt9"'))
    with pytest.raises(CheckpointError, match=r"config\.json: builder 'gpt9'"):
        load_lm(tmp_path / "m")


def test_shared_embedding(tmp_path) -> None:
    shared = nn.Embedding(41, 16)
    before = shared.weight.detach().clone()
    a, b = expert_lm(CFG, shared), summarizer_lm(CFG, embedding=shared)
    assert a.embedding is b.embedding is shared
    torch.testing.assert_close(shared.weight, before)  # builders never re-initialize a shared embedding
    save_lm(a, tmp_path / "a", include_embedding=False)
    with pytest.raises(CheckpointError, match="pass the shared embedding"):
        load_lm(tmp_path / "a")
    loaded = load_lm(tmp_path / "a", embedding=shared)
    assert loaded.embedding is shared
    with pytest.raises(ConfigError, match="shared embedding is 41 x 8"):
        expert_lm(CFG, nn.Embedding(41, 8))


def test_custom_mlp_factory_is_not_saved_by_save_lm(tmp_path) -> None:
    model = transformer_lm(CFG, mlp_factory=lambda i: SwiGLU(16, 24 + 8 * i))
    assert model.blocks[1].mlp.d_hidden == 32
    with pytest.raises(ConfigError, match="custom mlp_factory"):
        save_lm(model, tmp_path / "m")
