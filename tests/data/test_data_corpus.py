"""Corpus contracts: content ids, chunking (hand-derived cases + a property), de-dup, caps, splits, JSONL."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmoe.data.corpus import (
    SPLITS,
    Corpus,
    CorpusConfig,
    Document,
    cap,
    chunk_text,
    content_id,
    deduplicate,
    normalize,
    split_of,
)
from taskmoe.errors import ConfigError, DataError


def test_normalize_and_content_id_ignore_spacing_only():
    assert normalize("  Hello \n\t world  ") == "Hello world"
    assert content_id("Hello  world") == content_id("Hello world\n")
    assert content_id("Hello world") != content_id("hello world")  # case matters (code)
    assert Document("Hello world").id == content_id("Hello world")


def test_chunk_text_packs_paragraphs():
    # paragraphs "aaaa\n\n"(6) "bbbb\n\n"(6) "cccc"(4), max 10: 6+6 > 10 closes the first chunk,
    # 6+4 = 10 fits, so the last two paragraphs share a chunk.
    assert chunk_text("aaaa\n\nbbbb\n\ncccc", max_chars=10, min_chars=0) == ["aaaa", "bbbb\n\ncccc"]
    assert chunk_text("short text", max_chars=100, min_chars=0) == ["short text"]


def test_chunk_text_falls_back_to_lines_words_and_hard_cuts():
    # one 17-char paragraph > 8: lines "xxxxx\n"(6) "yyyyy\n"(6) "zzzzz"(5), none pair up within 8
    assert chunk_text("xxxxx\nyyyyy\nzzzzz", max_chars=8, min_chars=0) == ["xxxxx", "yyyyy", "zzzzz"]
    # one line > 5: words "aaa "(4) "bbb "(4) "ccc"(3)
    assert chunk_text("aaa bbb ccc", max_chars=5, min_chars=0) == ["aaa", "bbb", "ccc"]
    # one word > 4: hard cuts
    assert chunk_text("abcdefghij", max_chars=4, min_chars=0) == ["abcd", "efgh", "ij"]


def test_chunk_text_drops_short_chunks_and_keeps_indentation():
    assert chunk_text("aaaa\n\nbbbbbbbb", max_chars=10, min_chars=5) == ["bbbbbbbb"]
    code = "def f():\n    return 1\n\n\n    x = 2\n"
    # paragraphs "def f():\n    return 1\n\n\n"(24) and "    x = 2\n"(10): the indentation stays
    assert chunk_text(code, max_chars=25, min_chars=0) == ["def f():\n    return 1", "    x = 2"]
    assert chunk_text(code, max_chars=22, min_chars=0) == ["def f():\n    return 1", "    x = 2"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab \n\t"), max_size=400), st.integers(1, 40))
def test_chunk_text_covers_text_in_order_and_respects_max(text, max_chars):
    chunks = chunk_text(text, max_chars=max_chars, min_chars=0)
    assert all(0 < len(c) <= max_chars for c in chunks)
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    assert squash("".join(chunks)) == squash(text)


def test_deduplicate_keeps_first_copy():
    docs = [Document("one  two", source="a"), Document("three"), Document("one two\n", source="b")]
    kept = list(deduplicate(docs))
    assert [d.source for d in kept] == ["a", ""]


def test_cap_per_domain_by_docs_and_chars():
    docs = [Document("x" * 100 + str(i), domain="a") for i in range(3)] + [Document("y" * 10, domain="b")]
    assert [d.domain for d in cap(docs, max_docs=2)] == ["a", "a", "b"]
    # chars: 101 admitted, 101 would make 202 > 160 (refused), 50 makes 151 (admitted)
    docs = [Document("x" * 101, domain="a"), Document("z" * 101, domain="a"), Document("w" * 50, domain="a")]
    assert [len(d.text) for d in cap(docs, max_chars=160)] == [101, 50]


def test_split_is_deterministic_disjoint_order_free_and_near_fractions():
    docs = [Document(f"document number {i}") for i in range(3000)]
    a = Corpus.from_chunks(docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    b = Corpus.from_chunks(shuffled)
    for s in SPLITS:
        assert {d.id for d in a.splits[s]} == {d.id for d in b.splits[s]}
    ids = [{d.id for d in a.splits[s]} for s in SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 3000
    # binomial: train 2700 +- 4 sigma (sigma = sqrt(3000 * 0.9 * 0.1) ~ 16.4)
    assert abs(len(a.train) - 2700) < 66 and abs(len(a.validation) - 150) < 48
    # a document's split depends only on its id, so it is stable when the corpus grows
    grown = Corpus.from_chunks(docs + [Document(f"new {i}") for i in range(500)])
    assert {d.id for d in a.test} <= {d.id for d in grown.test}
    assert all(split_of(d.id) == "test" for d in a.test)


def test_from_documents_chunks_dedups_caps_and_keeps_domain():
    para = "\n\n".join(f"paragraph {i} " + "word " * 30 for i in range(20))
    docs = [Document(para, domain="d", source="s"), Document(para, domain="d", source="copy")]
    cfg = CorpusConfig(max_chunk_chars=400, min_chunk_chars=10)
    c = Corpus.from_documents(docs, cfg)
    chunks = list(c)
    assert all(d.domain == "d" and d.source.startswith("s#") for d in chunks)  # the copy was de-duplicated
    assert all(len(d.text) <= 400 for d in chunks)
    assert c.domains == ["d"]
    capped = Corpus.from_documents(docs, cfg.replace(max_docs_per_domain=3))
    assert len(capped) == 3


def test_corpus_save_load_roundtrip(tmp_path):
    c = Corpus.from_chunks([Document(f"text {i}", domain=["a", None][i % 2], source=f"s{i}") for i in range(50)])
    path = c.save(tmp_path / "c.jsonl")
    back = Corpus.load(path)
    assert back.splits == c.splits
    assert back.domains == ["a"]


def test_corpus_load_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"split": "train", "text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        Corpus.load(p)
    p.write_text('{"split": "dev", "text": "ok"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: split 'dev'"):
        Corpus.load(p)
    with pytest.raises(DataError, match="not found"):
        Corpus.load(tmp_path / "missing.jsonl")


def test_empty_corpus_and_bad_config_fail():
    with pytest.raises(DataError, match="corpus is empty"):
        Corpus.from_documents([Document("tiny")], CorpusConfig(min_chunk_chars=10))
    with pytest.raises(ConfigError, match="split_fractions"):
        CorpusConfig(split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="min_chunk_chars"):
        CorpusConfig(max_chunk_chars=10, min_chunk_chars=20)
