"""Torch datasets: packing windows and the single truncation rule (chat datasets: test_data_sft.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmoe.data.datasets import (
    IGNORE_INDEX,
    PackedLMDataset,
    masked_example,
    pack_documents,
    truncate_pair,
)
from taskmoe.errors import DataError


def test_pack_documents_wraps_each_doc_in_bos_eos():
    assert pack_documents([[5, 6], [], [7]], bos_id=1, eos_id=2).tolist() == [1, 5, 6, 2, 1, 7, 2]


def test_packed_windows_overlap_by_one_and_cover_every_target_once():
    ds = PackedLMDataset(torch.arange(11), seq_len=3)
    # (11 - 1) // 3 = 3 windows of 4 tokens, starting at 0, 3, 6; token 10 is the dropped tail
    assert len(ds) == 3
    assert [ds[i].tolist() for i in range(3)] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert ds[-1].tolist() == [6, 7, 8, 9] and ds[0].dtype == torch.long
    targets = torch.cat([ds[i][1:] for i in range(len(ds))]).tolist()
    assert targets == list(range(1, 10))
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(DataError, match="cannot fill one window"):
        PackedLMDataset(torch.arange(4), seq_len=4)


def test_packed_from_texts_decodes_to_the_documents(small_tokenizer):
    texts = ["first document text", "second <|eos|> one"]  # a special string in data stays plain text
    ds = PackedLMDataset.from_texts(texts, small_tokenizer, seq_len=4)
    assert small_tokenizer.decode(ds.tokens.tolist()) == "".join(f"<|bos|>{t}<|eos|>" for t in texts)
    assert (ds.tokens == small_tokenizer.eos_id).sum().item() == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    assert next(iter(loader)).shape == (2, 5)


def test_truncate_pair_hand_values():
    p, r = list(range(100, 108)), list(range(200, 208))
    # B = 10, p = 8, r = 8 -> k_r = min(8, 10 - min(8, 5)) = 5, k_p = min(8, 10 - 5) = 5
    assert truncate_pair(p, r, max_len=9) == ([100, 104, 105, 106, 107], [200, 201, 202, 203, 204])
    # B = 10, p = 20, r = 3 -> k_r = 3, k_p = 7: first token + last 6
    p20 = list(range(20))
    assert truncate_pair(p20, [7, 8, 9], max_len=9) == ([0, 14, 15, 16, 17, 18, 19], [7, 8, 9])
    # B = 10, p = 3, r = 20 -> k_r = 7, prompt kept whole
    assert truncate_pair([1, 2, 3], list(range(20)), max_len=9) == ([1, 2, 3], list(range(7)))
    assert truncate_pair([1, 2], [3], max_len=9) == ([1, 2], [3])
    with pytest.raises(DataError, match="max_len must be >= 2"):
        truncate_pair([1], [2], max_len=1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(2, 30))
def test_truncate_pair_properties(p, r, max_len):
    prompt, response = list(range(1000, 1000 + p)), list(range(r))
    kp, kr = truncate_pair(prompt, response, max_len)
    assert len(kp) + len(kr) == min(p + r, max_len + 1)
    assert kp[0] == prompt[0] and kp[1:] == prompt[len(prompt) - len(kp) + 1 :]
    assert kr == response[: len(kr)] and len(kr) >= 1
    assert len(kp) >= min(p, (max_len + 1) // 2)


def test_masked_example_shifts_and_masks_prompt():
    x, y = masked_example([1, 5, 6], [7, 8, 2], max_len=16)
    assert x.tolist() == [1, 5, 6, 7, 8]
    assert y.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 2]  # y[t] is the token after x[:t+1]
