"""`taskmoe generate PATH` on a single model folder: a DOE model (names its experts) or a plain LM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.doe.model import DOEConfig, build_doe, save_doe
from taskmoe.errors import ConfigError, DataError
from taskmoe.inference.commands import generate_text
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.models import LMConfig, save_lm, transformer_lm

TEXTS = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(200)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


def test_doe_folder_generates_like_the_model_and_names_experts(tmp_path: Path, tok: Tokenizer) -> None:
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2)
    model = build_doe(DOEConfig(lm=lm, experts=["a", "b", "c"])).eval()
    folder = save_doe(model, tmp_path / "doe")
    tok.save(tmp_path / "tokenizer.json")  # beside the model folder, as in a run folder
    out = generate_text(folder, "the quick brown", max_new_tokens=8)
    ids = [tok.bos_id, *tok.encode("the quick brown", allow_special=False)]
    want = generate(model, [ids], GenerationConfig(max_new_tokens=8, temperature=0.0, stop_tokens=[tok.eos_id]))[0]
    assert out["answer"] == tok.decode(want)
    assert out["kind"] == "doe"
    assert out["experts"] and set(out["experts"].split(", ")) <= {"a", "b", "c"}


def test_plain_lm_folder_and_missing_tokenizer(tmp_path: Path, tok: Tokenizer) -> None:
    torch.manual_seed(0)
    save_lm(transformer_lm(LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2)), tmp_path / "lm")
    with pytest.raises(DataError, match="no tokenizer.json"):
        generate_text(tmp_path / "lm", "fox", max_new_tokens=4)
    tok.save(tmp_path / "lm" / "tokenizer.json")
    out = generate_text(tmp_path / "lm", "fox", max_new_tokens=4)
    assert isinstance(out["answer"], str) and "experts" not in out
    with pytest.raises(ConfigError, match="applies to a backbone"):  # 4-bit weights are for backbones only
        generate_text(tmp_path / "lm", "fox", max_new_tokens=4, weights="int4")
