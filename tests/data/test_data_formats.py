"""Readers of Alpaca, HH-RLHF and AlpacaEval files (on small files written here, plus the real ones)."""

from __future__ import annotations

import gzip
import json

import pytest

from taskmoe.data.formats import parse_hh_dialogue, read_alpaca, read_alpaca_eval, read_hh_rlhf
from taskmoe.errors import DataError


def test_read_alpaca(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([
        {"instruction": "Translate.", "input": "bonjour", "output": " hello "},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]))
    a, b = read_alpaca(p)
    assert a.messages == [{"role": "user", "content": "Translate.\n\nbonjour"}] and a.response == "hello"
    assert b.messages == [{"role": "user", "content": "Say hi."}]
    p.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": "x",\n   "input": ""}\n]')
    with pytest.raises(DataError, match=r"a.json:3 \(record 1\): missing field 'output'"):
        read_alpaca(p)
    p.write_text('[{"instruction": "x", "output": 3}]')
    with pytest.raises(DataError, match=r"a.json:1 \(record 0\): field 'output' must be a string"):
        read_alpaca(p)
    p.write_text('[{"instruction": "x", "output": "y"},\n {"instruction": }]')
    with pytest.raises(DataError, match=r"a.json:2: not valid JSON"):
        read_alpaca(p)
    p.write_text("{}")
    with pytest.raises(DataError, match="expected a JSON list"):
        read_alpaca(p)


def test_read_alpaca_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    rows = [{"instruction": "Add.", "input": "2 + 2", "output": "4"}, {"instruction": "Say hi.", "output": "hi"}]
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + "\n" + json.dumps(["not", "a", "record"]) + "\n")
    with pytest.raises(DataError, match=r"a.jsonl.gz:4: expected a JSON object, got list"):
        read_alpaca(p)
    p2 = tmp_path / "b.jsonl"
    p2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = read_alpaca(p2)
    assert a.conversation == [{"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}]
    assert b.messages == [{"role": "user", "content": "Say hi."}]


def test_parse_hh_dialogue():
    text = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:  fine"
    assert parse_hh_dialogue(text) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how?"},
        {"role": "assistant", "content": "fine"},
    ]
    with pytest.raises(DataError, match="text before the first 'Human:' turn"):
        parse_hh_dialogue("just text")
    with pytest.raises(DataError, match="no '"):
        parse_hh_dialogue("  ")


def test_read_hh_rlhf(tmp_path):
    shared = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
    rows = [
        {"chosen": shared + " good", "rejected": shared + " bad"},
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: other\n\nAssistant: z"},  # prompts differ
    ]
    p = tmp_path / "hh.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.warns(UserWarning, match="skipped 1 pair"):
        (ex,) = read_hh_rlhf(p)
    assert [m["content"] for m in ex.messages] == ["q1", "a1", "q2"]
    assert (ex.chosen, ex.rejected) == ("good", "bad")
    p2 = tmp_path / "bad.jsonl"
    p2.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"chosen": "no turns here", "rejected": shared}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2 chosen: text before the first 'Human:' turn"):
        read_hh_rlhf(p2)
    p2.write_text(json.dumps({"chosen": shared + " x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'rejected'"):
        read_hh_rlhf(p2)


def test_read_alpaca_eval(tmp_path):
    rows = [
        {"instruction": "i1", "output_1": "o1", "output_2": "o2", "preference": 1},
        {"instruction": "i2", "output_1": "p1", "output_2": "p2", "preference": 2.0},
        {"instruction": "i3", "output_1": "t1", "output_2": "t2", "preference": 1.5},
        {"instruction": "i4", "output_1": "t1", "output_2": "t2", "preference": 0},
    ]
    p = tmp_path / "ae.json"
    p.write_text(json.dumps(rows))
    a, b = read_alpaca_eval(p)
    assert (a.chosen, a.rejected, b.chosen, b.rejected) == ("o1", "o2", "p2", "p1")
    assert b.messages == [{"role": "user", "content": "i2"}]


@pytest.mark.shared
def test_real_shared_files(shared):
    """The public files in ../shared/data parse completely (counts from data/README.md)."""
    data = shared / "data"
    alpaca = read_alpaca(data / "sft" / "alpaca_5000.json")
    assert len(alpaca) == 5000 and all(e.response for e in alpaca[:100])
    with pytest.warns(UserWarning):
        hh = read_hh_rlhf(data / "dpo" / "hh_rlhf_harmless_base_test.jsonl.gz")
    assert 2300 <= len(hh) <= 2312
    assert all(e.messages[-1]["role"] == "user" for e in hh)
    ae = read_alpaca_eval(data / "dpo" / "alpacaeval_alpaca7b_vs_davinci003_gpt4judge.json")
    assert 780 <= len(ae) <= 805
