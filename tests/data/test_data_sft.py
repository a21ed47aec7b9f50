"""Chat rendering with an assistant mask, and the SFT / preference datasets built on it.

The central contract: the SFT mask covers exactly the assistant tokens (content + end-of-turn),
for taskmoe's tokenizer and for a Hugging Face tokenizer with a Jinja chat template."""

from __future__ import annotations

import pytest
import torch

from taskmoe.data.chat import prompt_ids, render_chat
from taskmoe.data.datasets import IGNORE_INDEX
from taskmoe.data.formats import PreferenceExample, SFTExample
from taskmoe.data.sft import GroupedBatches, PreferenceDataset, SFTDataset, length_grouped_batches
from taskmoe.errors import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, of course."},
]


def _expected_mask(tok, chat):
    """By hand: <|bos|>, then per message <|role|> content <|eos|>; True on an assistant's content + <|eos|>."""
    ids, mask = [tok.bos_id], [False]
    for m in chat:
        content = tok.encode(m["content"], allow_special=False)
        ids += [tok.special_ids[f"<|{m['role']}|>"], *content, tok.eos_id]
        mask += [False] + [m["role"] == "assistant"] * (len(content) + 1)
    return ids, mask


def test_mask_covers_exactly_the_assistant_tokens(small_tokenizer):
    r = render_chat(small_tokenizer, CHAT)
    ids, mask = _expected_mask(small_tokenizer, CHAT)
    assert r.ids == ids and r.assistant_mask == mask
    assert [small_tokenizer.decode(r.ids[a:b]) for a, b in r.spans] == ["Blue.<|eos|>", "Green, of course.<|eos|>"]
    assert prompt_ids(small_tokenizer, CHAT[:2]) == r.ids[: r.spans[0][0]]
    item = SFTDataset([CHAT], small_tokenizer, max_len=512)[0]
    targets = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert targets == [i for i, m in zip(ids, mask) if m]
    assert item["input_ids"].tolist() == ids[:-1]
    assert [bool(x) for x in item["labels"] != IGNORE_INDEX] == mask[1:]


def _hf(small_tokenizer, template):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=small_tokenizer._tok, eos_token="<|eos|>")
    hf.chat_template = template
    return hf


def test_hugging_face_jinja_template_mask_by_prefixes(small_tokenizer):
    hf = _hf(small_tokenizer, "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    r = render_chat(hf, CHAT)
    assert r.ids == hf.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    masked = [hf.decode(r.ids[a:b]) for a, b in r.spans]
    assert masked == ["Blue.<|eos|>\n", "Green, of course.<|eos|>\n"]
    assert sum(r.assistant_mask) == sum(b - a for a, b in r.spans)
    ds = SFTDataset([CHAT], hf, max_len=512)
    assert ds.pad_id == hf.eos_token_id
    only_last = _hf(small_tokenizer, "{{ messages[-1]['content'] }}")
    with pytest.raises(DataError, match="not prefix-stable at message 2"):
        render_chat(only_last, CHAT)


def test_sft_dataset_labels_are_response_plus_eos(small_tokenizer):
    ex = [
        SFTExample.from_prompt("Say hi", "hi there"),
        SFTExample.from_prompt("Count", "one two three four", system="Be exact."),
    ]
    ds = SFTDataset(ex, small_tokenizer, max_len=256)
    for e, item in zip(ex, ds):
        prompt = small_tokenizer.encode_chat(e.messages)
        response = small_tokenizer.encode(e.response) + [small_tokenizer.eos_id]
        assert item["input_ids"].tolist() == (prompt + response)[:-1]
        assert item["labels"][item["labels"] != IGNORE_INDEX].tolist() == response
        assert (item["labels"] == IGNORE_INDEX).sum().item() == len(prompt) - 1
    batch = ds.collate([ds[0], ds[1]])
    n0 = ds[0]["input_ids"].numel()
    assert batch["input_ids"].shape == batch["labels"].shape == (2, ds[1]["input_ids"].numel())
    assert (batch["input_ids"][0, n0:] == small_tokenizer.pad_id).all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [n0, ds[1]["input_ids"].numel()]
    with pytest.raises(DataError, match="SFT example 0: no assistant turn"):
        SFTDataset([CHAT[:2]], small_tokenizer, max_len=64)


def test_sft_truncation_keeps_bos_and_assistant_tag(small_tokenizer):
    ds = SFTDataset([SFTExample.from_prompt("word " * 200, "answer " * 200)], small_tokenizer, max_len=32)
    item = ds[0]
    assert item["input_ids"].numel() == 32
    ids = item["input_ids"].tolist()
    assert ids[0] == small_tokenizer.bos_id
    first_target = int((item["labels"] != IGNORE_INDEX).nonzero()[0])
    assert ids[first_target] == small_tokenizer.special_ids["<|assistant|>"]


def test_preference_dataset_scores_only_the_final_turn(small_tokenizer):
    prompt = [{"role": "user", "content": "Pick"}, {"role": "assistant", "content": "earlier answer"},
              {"role": "user", "content": "Again"}]
    ex = [PreferenceExample(prompt, "a long chosen answer here", "no")]
    ds = PreferenceDataset(ex * 2, small_tokenizer, max_len=64)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    eos = small_tokenizer.eos_id
    assert batch["rejected_labels"][0][batch["rejected_labels"][0] != IGNORE_INDEX].tolist() == (
        small_tokenizer.encode("no") + [eos])
    assert batch["chosen_labels"][0][batch["chosen_labels"][0] != IGNORE_INDEX].tolist() == (
        small_tokenizer.encode("a long chosen answer here") + [eos])
    n = ds[0]["chosen_input_ids"].numel()
    assert batch["chosen_input_ids"][0, :n].tolist() == ds[0]["chosen_input_ids"].tolist()
    assert batch["chosen_attention_mask"][0].sum() == n
    with pytest.raises(DataError, match="no examples"):
        PreferenceDataset([], small_tokenizer, max_len=8)


def test_length_grouped_batches_cover_every_index_once_and_pad_less(small_tokenizer):
    lengths = torch.randint(1, 200, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = length_grouped_batches(lengths, 8, seed=3, mega=4)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert batches == length_grouped_batches(lengths, 8, seed=3, mega=4) != length_grouped_batches(lengths, 8, seed=4, mega=4)
    for a in range(0, len(batches), 4):  # inside a mega-batch, lengths fall batch after batch
        flat = [lengths[i] for b in batches[a : a + 4] for i in b]
        assert flat == sorted(flat, reverse=True)
    chats = [SFTExample.from_prompt("q " * int(n % 40 + 1), "a " * int(n % 13 + 1)) for n in lengths[:64]]
    ds = SFTDataset(chats, small_tokenizer, max_len=128)
    grouped, random_batches = GroupedBatches(ds, 8, seed=0), GroupedBatches(ds, 8, seed=0, mega=1)
    assert grouped.padding_fraction() < random_batches.padding_fraction()
    batch = grouped.collate([grouped[0]])
    assert batch["input_ids"].shape[0] == 8


@pytest.mark.shared
def test_real_alpaca_and_hh_rlhf_render_with_exact_masks(shared, small_tokenizer):
    from taskmoe.data.formats import read_alpaca, read_hh_rlhf

    alpaca = read_alpaca(shared / "data" / "sft" / "alpaca_data_cleaned_1000.json")[:100]
    ds = SFTDataset(alpaca, small_tokenizer, max_len=4096)  # long enough: nothing is truncated
    for ex, item in zip(alpaca, ds):
        want = small_tokenizer.encode(ex.response, allow_special=False) + [small_tokenizer.eos_id]
        assert item["labels"][item["labels"] != IGNORE_INDEX].tolist() == want
    with pytest.warns(UserWarning):
        hh = read_hh_rlhf(shared / "data" / "dpo" / "hh_rlhf_harmless_base_test.jsonl.gz")[:50]
    pref = PreferenceDataset(hh, small_tokenizer, max_len=4096)
    for ex, item in zip(hh, pref):
        got = item["rejected_labels"][item["rejected_labels"] != IGNORE_INDEX].tolist()
        assert got == small_tokenizer.encode(ex.rejected, allow_special=False) + [small_tokenizer.eos_id]


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_backbone_tokenizer_chatml_mask(small_tokenizer):
    """A backbone tokenizer (SmolLM2's ChatML template, with its default system turn) through render_chat."""
    from tokenizers import Tokenizer as HFTokenizer

    from taskmoe.data.backbone_tokenizer import BackboneTokenizer

    backend = HFTokenizer.from_str(small_tokenizer.to_str())
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = BackboneTokenizer(backend, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, CHATML)
    r = render_chat(tok, CHAT[1:])  # no system turn: the template adds its default one to every prefix
    assert [tok.decode(r.ids[a:b]) for a, b in r.spans] == ["Blue.<|im_end|>\n", "Green, of course.<|im_end|>\n"]
    assert tok.decode(prompt_ids(tok, CHAT[1:2])).endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")
    item = SFTDataset([CHAT[1:]], tok, max_len=512)[0]
    assert tok.decode(item["labels"][item["labels"] != IGNORE_INDEX].tolist()) == (
        "Blue.<|im_end|>\nGreen, of course.<|im_end|>\n")
