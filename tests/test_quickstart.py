"""``taskmoe quickstart --tiny`` end to end into a temporary folder: the report and plots exist, the
system loads and answers, a rerun resumes without retraining, and the CLI commands work on it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import taskmoe
from taskmoe.cli import build_app
from taskmoe.errors import ConfigError
from taskmoe.training.recipes.quickstart import PRESETS, quickstart, run_quickstart

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("routing_map.png", "loss_curves.png", "expert_usage.png", "expert_perplexity.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("qs") / "run"
        yield out, quickstart(out=out, tiny=True, progress=False)
    finally:
        torch.set_num_threads(n)


def test_tiny_quickstart_writes_report_plots_and_a_loadable_system(tiny_run) -> None:
    out, res = tiny_run
    assert res.report == out / "report.md" and res.report.is_file()
    assert [s["stage"] for s in res.stages] == ["corpus", "tokenizer", "router", "experts", "summarizer", "calibrate",
                                                "samples", "report"]
    assert all(s["status"] == "ran" for s in res.stages)
    text = res.report.read_text()
    for section in ("## Routing", "## Perplexity", "### Does fusion help?", "## Loss curves", "## Expert usage",
                    "## Sample answers", "## Stages"):
        assert section in text
    for png in PLOTS:
        assert (out / "reports" / png).read_bytes()[:8] == PNG and f"reports/{png}" in text
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    assert 0.0 <= metrics["routing"]["nmi"] <= 1.0
    assert {r["domain"] for r in metrics["fusion"]} >= {"code", "all"}
    assert metrics["adapter"]["code_ppl_with_adapter"] > 0 and 0 <= metrics["adapter"]["intent_accuracy"] <= 1
    assert len(res.samples) == 4 and {s["domain"] for s in res.samples} == {"code", "conversation", "legal", "literature"}
    manifest = json.loads((out / "taskmoe.json").read_text())
    assert manifest["summarizer"] == "summarizer" and manifest["adapters"] == {"code": "summarizer/adapters/code"}
    assert len(manifest["experts"]) == PRESETS["tiny"].n_categories
    assert 0.0 <= manifest["meta"]["pipeline"]["disagreement"]["threshold"] <= 1.0
    system = taskmoe.load(out)
    a = system.generate("def add(a, b):\n    return a + b")
    assert a.trace is not None and a.trace.routing["selected"] and a.trace.experts
    assert a.trace.clarify or a.trace.answer_tokens == len(a.ids)


def test_tiny_quickstart_system_can_crosstalk(tiny_run) -> None:
    """No crosstalk/ folder is trained by the quickstart: a flagged pair talks with the base experts."""
    from taskmoe.router.policy import PolicyConfig

    out, res = tiny_run
    assert all("crosstalk" in s for s in res.samples)
    system = taskmoe.load(out)
    system.router.policy = PolicyConfig(t_C_base=system.router.policy.t_C_base, k=system.router.policy.k, t_CT=1.0)
    a = system.generate("The court shall decide whether the licensee may print the poem")
    ct = a.trace.crosstalk
    assert ct is not None and ct["ran"] and ct["adapters"].startswith("none") and ct["turns"]
    assert {t["expert"] for t in ct["turns"]} <= set(ct["pair"]) and set(ct["pair"]) <= {d.expert for d in a.trace.drafts}
    assert a.trace.clarify or a.trace.answer_tokens == len(a.ids)


def test_rerun_resumes_without_retraining(tiny_run) -> None:
    out, _ = tiny_run
    weights = {p: p.read_bytes() for p in sorted((out / "experts").glob("*/model.safetensors"))}
    summ = (out / "summarizer" / "model.safetensors").read_bytes()
    report_mtime = (out / "report.md").stat().st_mtime_ns
    again = quickstart(out=out, tiny=True, progress=False)
    status = {s["stage"]: s["status"] for s in again.stages}
    assert status == {"corpus": "ran", "tokenizer": "skipped", "router": "skipped", "experts": "skipped",
                      "summarizer": "skipped", "calibrate": "skipped", "samples": "skipped", "report": "skipped"}
    assert {p: p.read_bytes() for p in weights} == weights
    assert (out / "summarizer" / "model.safetensors").read_bytes() == summ
    assert (out / "report.md").stat().st_mtime_ns == report_mtime
    with pytest.raises(ConfigError, match="different sizes"):
        run_quickstart(out, PRESETS["tiny"].replace(seed=1), preset="tiny")


def test_force_refuses_a_folder_quickstart_did_not_create(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="refusing to delete"):
        quickstart(out=tmp_path, tiny=True, force=True, progress=False)
    with pytest.raises(ConfigError, match="not a quickstart run"):
        quickstart(out=tmp_path, tiny=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_generate_and_chat_on_the_run(tiny_run) -> None:
    out, _ = tiny_run
    runner = CliRunner()
    r = runner.invoke(build_app(), ["generate", str(out), "the licensee shall", "--trace", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert "route ->" in r.output and "timings:" in r.output
    r = runner.invoke(build_app(), ["chat", str(out)], input="hello, how are you?\nwhat do you like?\n/exit\nnot read\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("route ->") == 2 and r.output.count("B:") == 2
    r = runner.invoke(build_app(), ["generate", str(out / "missing"), "x"])
    assert r.exit_code == 2 and "no taskmoe.json" in " ".join(r.output.split())


def test_train_summarizer_command_retrains_and_registers(tiny_run, tmp_path) -> None:
    from taskmoe.training.recipes.summarizer_run import train_summarizer

    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("summarizer", "train_summarizer", "train_code_adapter"))
    m = json.loads((run / "taskmoe.json").read_text())
    m.update(summarizer=None, adapters={})
    (run / "taskmoe.json").write_text(json.dumps(m))
    cached = (run / "drafts.jsonl").read_text().count("\n")
    row = train_summarizer(run=run, max_docs_per_domain=PRESETS["tiny"].max_docs_per_domain, steps=4, adapter_steps=2,
                           n_layers=1, prompt_tokens=24, target_tokens=16, draft_tokens=12, max_len=128, progress=False)
    assert (run / "drafts.jsonl").read_text().count("\n") == cached  # every draft came from the cache
    assert 0.0 <= row["disagreement_threshold"] <= 1.0 and 0.0 <= row["intent_val_accuracy"] <= 1.0
    m = json.loads((run / "taskmoe.json").read_text())
    assert m["summarizer"] == "summarizer" and m["meta"]["summarizer"]["recipe"]["train"]["max_steps"] == 4
    assert m["meta"]["pipeline"]["disagreement"]["threshold"] == row["disagreement_threshold"]
    assert taskmoe.load(run).generate("hello").trace is not None
