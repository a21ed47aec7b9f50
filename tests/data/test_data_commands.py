"""The data CLI commands as Python functions and through the Typer app."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from taskmoe.cli import build_app
from taskmoe.data.commands import data_build, data_stats, tokenizer_train
from taskmoe.data.corpus import SPLITS, Corpus
from taskmoe.data.sources import JsonlFile
from taskmoe.data.tokenizer import Tokenizer


def _jsonl_source(tmp_path):
    rows = [{"text": f"Paragraph {i} about topic {i % 3}. " * 4, "topic": f"t{i % 2}"} for i in range(60)]
    p = tmp_path / "src.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_data_stats_counts_match_an_independent_count(tmp_path, small_tokenizer):
    src = _jsonl_source(tmp_path)
    tok_path = small_tokenizer.save(tmp_path / "tokenizer.json")
    rows = data_stats(source=str(src), tokenizer=tok_path, domain_field="topic", progress=False)
    assert {r["domain"] for r in rows} == {"t0", "t1", "ALL"}
    corpus = Corpus.from_documents(JsonlFile(src, domain_field="topic"))
    for r in rows:
        if r["domain"] == "ALL":
            continue
        docs = [d for d in corpus.splits[r["split"]] if d.domain == r["domain"]]
        assert r["documents"] == len(docs)
        assert r["tokens"] == sum(len(small_tokenizer.encode(d.text, allow_special=False)) for d in docs)
        assert r["bytes"] == sum(len(d.text.encode()) for d in docs)
    total = rows[-1]
    assert (total["domain"], total["split"], total["documents"]) == ("ALL", "all", 60)
    assert total["tokens"] == sum(r["tokens"] for r in rows if r["domain"] != "ALL")


def test_data_stats_default_is_deterministic_with_four_domains(tmp_path):
    kw = dict(max_docs_per_domain=8, vocab_size=400, cache_dir=tmp_path, progress=False)
    a = data_stats(**kw)
    assert {r["domain"] for r in a} == {"code", "conversation", "legal", "literature", "ALL"}
    assert sum(r["documents"] for r in a if r["domain"] == "ALL" and r["split"] in SPLITS) == 32
    for f in tmp_path.glob("tokenizer-*.json"):  # drop the cached tokenizer: retraining must agree
        f.unlink()
    assert data_stats(**kw) == a


def test_data_build_and_tokenizer_train_write_files(tmp_path):
    src = _jsonl_source(tmp_path)
    res = data_build(out=tmp_path / "built", source=str(src), progress=False)
    corpus = Corpus.load(res["path"])
    assert len(corpus) == 60
    manifest = json.loads((tmp_path / "built" / "manifest.json").read_text())
    assert sum(manifest["documents"].values()) == 60 and manifest["source"] == str(src)
    out = tokenizer_train(out=tmp_path / "tok.json", vocab_size=300, source=str(src), progress=False)
    assert out["vocab_size"] == 300 and Tokenizer.load(out["path"]).vocab_size == 300


def test_cli_runs_the_commands_and_reports_errors(tmp_path, small_tokenizer):
    src = _jsonl_source(tmp_path)
    tok = small_tokenizer.save(tmp_path / "tokenizer.json")
    runner = CliRunner()
    app = build_app()
    r = runner.invoke(app, ["data", "stats", "--source", str(src), "--tokenizer", str(tok), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "ALL" in r.output and "tokens" in r.output
    r = runner.invoke(app, ["data", "stats", "--source", str(tmp_path / "missing.jsonl"), "--no-progress"])
    assert r.exit_code == 2 and "file not found" in r.output
    args = ["tokenizer", "train", "--source", str(src), "--out", str(tmp_path / "t"), "--vocab-size", "300"]
    r = runner.invoke(app, args + ["--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t" / "tokenizer.json").is_file()
