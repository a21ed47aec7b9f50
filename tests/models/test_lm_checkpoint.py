"""save_lm / load_lm round trip, shared embeddings, and errors that name the file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.layers import SwiGLU
from taskmoe.models import CONFIGS, ExpertLMConfig, LinearAttentionConfig, LMConfig, expert_lm, load_lm, save_lm, summarizer_lm, transformer_lm

CFG = ExpertLMConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, attention=LinearAttentionConfig(chunk_size=4))


@pytest.mark.parametrize("builder", [expert_lm, summarizer_lm, transformer_lm], ids=lambda b: b.__name__)
def test_round_trip(tmp_path, builder) -> None:
    model = builder(CFG).eval()
    save_lm(model, tmp_path / "m", kind="expert", meta={"domain": "legal"})
    loaded = load_lm(tmp_path / "m", kind="expert").eval()
    assert loaded.builder == builder.__name__ and loaded.config == model.config
    assert type(loaded.config) is CONFIGS[builder.__name__] and loaded.config.base() == CFG.base()
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


OLD_UNION = {"conv_kernel": 3, "conv_levels": 2, "la_feature_map": "elu1", "la_decay": "fixed", "la_normalize": True,
             "chunk_size": 4, "ssm_state": 8, "ssm_expand": 2, "ssm_conv": 3, "ssm_dt_rank": 0, "ssm_chunk": 0,
             "rope_base": 500.0}
"""Every architecture field of the flat ``LMConfig`` that config.json files held before the split."""


@pytest.mark.parametrize("builder", [expert_lm, summarizer_lm, transformer_lm], ids=lambda b: b.__name__)
def test_old_union_config_json_still_loads(tmp_path, builder) -> None:
    """A folder whose config.json "lm" is the old flat union loads with its own architecture's fields."""
    import json

    from taskmoe.models import ConvConfig, SSMConfig, SummarizerLMConfig, TransformerLMConfig

    base = dict(vocab_size=41, d_model=16, n_layers=2, n_heads=2)
    own = {expert_lm: ExpertLMConfig(**base, conv=ConvConfig(kernel=3, levels=2),
                                     attention=LinearAttentionConfig(feature_map="elu1", decay="fixed", normalize=True,
                                                                     chunk_size=4)),
           summarizer_lm: SummarizerLMConfig(**base, ssm=SSMConfig(state=8, conv=3)),
           transformer_lm: TransformerLMConfig(**base, rope_base=500.0)}[builder]
    model = builder(own).eval()
    save_lm(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    doc = json.loads(path.read_text())
    doc["config"]["lm"] = {**own.base().to_dict(), **OLD_UNION}  # what the old code wrote
    path.write_text(json.dumps(doc))
    loaded = load_lm(tmp_path / "m").eval()
    assert loaded.config == own
    ids = torch.randint(0, 41, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    doc["config"]["lm"]["chunk_sise"] = 4  # a typo is still an error, not a dropped legacy field
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="chunk_sise"):
        load_lm(tmp_path / "m")


def test_old_union_inside_a_doe_config() -> None:
    from taskmoe.doe.model import DOEConfig
    from taskmoe.models import TransformerLMConfig

    base = dict(vocab_size=41, d_model=16, n_layers=2, n_heads=2, mlp_hidden=0, norm_eps=1e-5, dropout=0.0, init_std=0.02)
    cfg = DOEConfig.from_dict({"lm": {**base, **OLD_UNION}, "experts": ["a", "b"]})
    assert cfg.lm == TransformerLMConfig(**base, rope_base=500.0)
