"""Fixtures of the data tests: a small default corpus and a small tokenizer trained on it (built once)."""

from __future__ import annotations

import pytest

from taskmoe.data.corpus import Corpus
from taskmoe.data.default import load_default_corpus
from taskmoe.data.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """40 chunks per domain of the real default corpus (no cache shared with the user)."""
    return load_default_corpus(max_docs_per_domain=40, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus: Corpus) -> Tokenizer:
    return Tokenizer.train([d.text for d in small_corpus.train], 512, show_progress=False)
