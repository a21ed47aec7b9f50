"""Run manifest: round trip, and clear errors for missing parts and vocabulary mismatches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskmoe.errors import CheckpointError
from taskmoe.io import save_component
from taskmoe.manifest import Manifest, Thresholds, load_manifest


def _run(tmp_path: Path, expert_vocab: int = 100) -> Path:
    run = tmp_path / "run"
    (run).mkdir()
    (run / "tokenizer.json").write_text("{}")
    save_component(run / "router", "router", {"encoder": {"vocab_size": 100, "d_model": 8}}, {"w": torch.zeros(1)})
    save_component(run / "experts" / "e0", "expert_lm", {"vocab_size": expert_vocab, "d_model": 8}, {"w": torch.zeros(1)})
    Manifest(experts={"0": "experts/e0"}, thresholds=Thresholds(t_C_base=0.4), vocab_size=100, d_model=8).save(run)
    return run


def test_round_trip(tmp_path: Path) -> None:
    res = load_manifest(_run(tmp_path))
    assert res.manifest.thresholds.t_C_base == 0.4
    assert res.experts[0].name == "e0"
    assert res.summarizer is None


def test_vocab_mismatch_names_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"e0/config.json.*vocab_size 90.*100"):
        load_manifest(_run(tmp_path, expert_vocab=90))


def test_missing_parts(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no taskmoe.json"):
        load_manifest(tmp_path)
    run = _run(tmp_path)
    (run / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer 'tokenizer.json' not found"):
        load_manifest(run)


def test_paths_cannot_escape_run_folder(tmp_path: Path) -> None:
    run = _run(tmp_path)
    Manifest(router="../../etc", vocab_size=100, d_model=8).save(run)
    with pytest.raises(CheckpointError, match="outside the run folder"):
        load_manifest(run)
