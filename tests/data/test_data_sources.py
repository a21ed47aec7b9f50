"""Corpus sources on local files: text folders, JSONL, Parquet, Hugging Face datasets; their errors."""

from __future__ import annotations

import gzip
import json

import pytest

from taskmoe.data.sources import HFDataset, JsonlFile, ParquetFile, TextFolder, open_source
from taskmoe.errors import DataError


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- text folder
def test_text_folder_reads_sorted_recursive_and_replaces_bad_bytes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("beta", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 ok")
    docs = list(TextFolder(tmp_path, domain="d"))
    assert [d.source for d in docs] == ["b.txt", "latin.txt", "sub/a.txt"]  # sorted, empty skipped
    assert docs[1].text == "caf\ufffd ok"
    assert {d.domain for d in docs} == {"d"}
    assert [d.text for d in TextFolder(tmp_path, pattern="*.md")] == ["ignored"]


def test_text_folder_errors(tmp_path):
    with pytest.raises(DataError, match="text folder not found"):
        list(TextFolder(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"no files match '\*\*/\*.txt'"):
        list(TextFolder(tmp_path))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="source is empty"):
        list(TextFolder(tmp_path))
    (tmp_path / "e.txt").write_text("text")
    with pytest.raises(DataError, match=r"e.txt: cannot read text file"):
        list(TextFolder(tmp_path, encoding="no-such-codec"))


# ---------------------------------------------------------------------------------- JSONL
def test_jsonl_text_and_domain_fields(tmp_path):
    p = _write_jsonl(tmp_path / "c.jsonl", [{"body": "first", "topic": "x"}, {"body": "second", "topic": "y"}])
    docs = list(JsonlFile(p, text_field="body", domain_field="topic"))
    assert [(d.text, d.domain, d.source) for d in docs] == [("first", "x", f"{p}:1"), ("second", "y", f"{p}:2")]


def test_jsonl_gz_and_json_list(tmp_path):
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n\n")
    assert [d.text for d in JsonlFile(gz)] == ["zipped"]
    js = tmp_path / "c.json"
    js.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [d.text for d in JsonlFile(js)] == ["a", "b"]


def test_jsonl_errors_name_line_and_field(tmp_path):
    p = _write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"content": "no text field"}])
    with pytest.raises(DataError, match=r"c.jsonl:2: missing text field 'text' \(fields: \['content'\]\)"):
        list(JsonlFile(p))
    p.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: not valid JSON"):
        list(JsonlFile(p))
    p.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="must be a string"):
        list(JsonlFile(p))
    p.write_text('{"text": "ok"}\n')
    with pytest.raises(DataError, match="missing domain field 'topic'"):
        list(JsonlFile(p, domain_field="topic"))
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a long enough line"}\n' * 50)[:40])
    with pytest.raises(DataError, match="t.jsonl.gz: cannot read"):
        list(JsonlFile(truncated))
    with pytest.raises(DataError, match="file not found"):
        list(JsonlFile(tmp_path / "missing.jsonl"))


# -------------------------------------------------------------------------------- Parquet
def test_parquet_columns_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["one", None, "three"], "dom": ["a", "b", "c"]}), p)
    docs = list(ParquetFile(p, domain_field="dom", batch_size=2))
    assert [(d.text, d.domain, d.source) for d in docs] == [("one", "a", f"{p}[0]"), ("three", "c", f"{p}[2]")]
    with pytest.raises(DataError, match=r"missing column\(s\) \['body'\] \(columns: \['text', 'dom'\]\)"):
        list(ParquetFile(p, text_field="body"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet: cannot read Parquet"):
        list(ParquetFile(bad))


# ---------------------------------------------------------------------- Hugging Face datasets
def test_hf_local_files_and_saved_folders(tmp_path):
    import datasets

    p = _write_jsonl(tmp_path / "c.jsonl", [{"text": f"row {i}", "label": f"d{i % 2}"} for i in range(6)])
    src = HFDataset("json", data_files=str(p), domain_field="label", cache_dir=tmp_path / "hf-cache")
    docs = list(src)
    assert [d.text for d in docs] == [f"row {i}" for i in range(6)]
    assert [d.domain for d in docs[:2]] == ["d0", "d1"]

    ds = datasets.Dataset.from_dict({"text": ["saved a", "saved b"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [d.text for d in open_source(tmp_path / "saved")] == ["saved a", "saved b"]

    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["val"]})})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert [d.text for d in HFDataset(tmp_path / "saved_dict", split="validation")] == ["val"]
    with pytest.raises(DataError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        list(HFDataset(tmp_path / "saved_dict", split="test"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['body'\]"):
        list(HFDataset(tmp_path / "saved", text_field="body"))
    with pytest.raises(DataError, match="cannot load dataset"):
        list(HFDataset("json", data_files=str(tmp_path / "absent.jsonl"), cache_dir=tmp_path / "hf-cache"))


# ------------------------------------------------------------------------------ dispatch
def test_open_source_dispatch(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "txt").mkdir()
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "c.parquet")
    _write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    assert isinstance(open_source(tmp_path / "txt"), TextFolder)
    assert isinstance(open_source(tmp_path / "c.parquet"), ParquetFile)
    assert isinstance(open_source(tmp_path / "c.jsonl"), JsonlFile)
    assert isinstance(open_source("hf:some/name"), HFDataset)
    with pytest.raises(DataError, match="source not found"):
        open_source(tmp_path / "missing")
    (tmp_path / "c.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported source type"):
        open_source(tmp_path / "c.csv")
