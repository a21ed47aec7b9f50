"""Fusion pairs: the cut is deterministic, prompt + target are contiguous true text, dialogues
give turn -> reply in the corpus's own format."""

from __future__ import annotations

import pytest

from taskmoe.data.corpus import Document
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.summarizer.examples import continuation_pair, dialogue_turns, fusion_pairs, reply_pairs

CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n" * 3
CHAT = "A: how are you today?\nB: fine thanks, and you?\nA: good.\nB: glad to hear it."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([CODE, CHAT] * 3, vocab_size=300)


def test_continuation_is_contiguous_and_deterministic() -> None:
    ids = list(range(100))
    p = continuation_pair("doc1", ids, domain="code", prompt_tokens=10, target_tokens=5, min_prompt=10)
    assert p is not None and p == continuation_pair("doc1", ids, domain="code", prompt_tokens=10, target_tokens=5, min_prompt=10)
    c = p.target[0]
    assert list(p.prompt) == list(range(c - 10, c)) and list(p.target) == list(range(c, c + 5))
    assert 10 <= c <= 96
    assert continuation_pair("doc1", list(range(10)), domain=None, prompt_tokens=10, target_tokens=5) is None


def test_dialogue_turns_and_replies(tok: Tokenizer) -> None:
    assert dialogue_turns(CHAT)[1] == ("B", "fine thanks, and you?")
    assert dialogue_turns(CODE) == []
    pairs = reply_pairs("d", CHAT, tok, domain="conversation", prompt_tokens=64, target_tokens=64, max_pairs=3)
    assert len(pairs) == 3
    texts = {(tok.decode(p.prompt), tok.decode(p.target)) for p in pairs}
    assert ("A: how are you today?\nB:", " fine thanks, and you?") in texts
    assert ("B: fine thanks, and you?\nA:", " good.") in texts


def test_fusion_pairs_mixes_kinds(tok: Tokenizer) -> None:
    docs = [Document(CODE, "code", "t"), Document(CHAT, "conversation", "t")]
    pairs = fusion_pairs(docs, tok, prompt_tokens=16, target_tokens=8, max_replies_per_doc=1)
    assert [p.kind for p in pairs] == ["continuation", "reply"]
    cont = pairs[0]
    ids = tok.encode(CODE)
    joined = list(cont.prompt) + list(cont.target)
    assert any(ids[i : i + len(joined)] == joined for i in range(len(ids)))  # true contiguous text
    assert len(cont.prompt) == 16 and len(cont.target) == 8
