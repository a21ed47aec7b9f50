"""Held-out chat quality equals the trainers' own quantities: minus the SFT loss, and chosen-vs-rejected
completion log-probabilities as DPO sums them."""

from __future__ import annotations

import pytest
import torch

from taskmoe.data.formats import PreferenceExample, SFTExample
from taskmoe.data.sft import PreferenceDataset, SFTDataset, split_examples
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.eval.chat_quality import preference_accuracy, reference_loglik
from taskmoe.models import LMConfig, transformer_lm
from taskmoe.training.losses import completion_logprob, lm_cross_entropy


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.train(["the cat sat on a mat", "a dog ran in the sun"] * 10, 290, show_progress=False)
    torch.manual_seed(0)
    return tok, transformer_lm(LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2)).eval()


def test_reference_loglik_is_minus_the_sft_loss(setup):
    tok, model = setup
    ex = [SFTExample.from_prompt(f"say {w}", f"{w} the cat") for w in ("a", "dog ran", "sun sat on")]
    got = reference_loglik(model, tok, ex, batch_size=2)  # two batches: token-weighted, not a mean of means
    ds = SFTDataset(ex, tok, 512)
    b = ds.collate([ds[i] for i in range(3)])
    with torch.no_grad():
        want = -lm_cross_entropy(model(b["input_ids"]).logits, b["labels"]).item()
    assert got["mean_ll_per_token"] == pytest.approx(want, abs=1e-6) and got["examples"] == 3


def test_preference_accuracy_compares_completion_logprobs(setup):
    tok, model = setup
    pairs = [PreferenceExample([{"role": "user", "content": f"q{i}"}], c, r)
             for i, (c, r) in enumerate([("the cat", "a dog"), ("sun", "mat mat mat"), ("ran", "sat")])]
    got = preference_accuracy(model, tok, pairs, batch_size=2)
    ds = PreferenceDataset(pairs, tok, 512)
    b = ds.collate([ds[i] for i in range(3)])
    with torch.no_grad():
        w = completion_logprob(model(b["chosen_input_ids"]).logits, b["chosen_labels"])
        l = completion_logprob(model(b["rejected_input_ids"]).logits, b["rejected_labels"])
    assert got["accuracy"] == pytest.approx(float((w > l).float().mean()))
    assert got["mean_margin"] == pytest.approx(float((w - l).mean()), abs=1e-5)
    train, held = split_examples(pairs, 1, seed=0)
    assert len(held) == 1 and held[0] not in train and split_examples(pairs, 1, seed=0) == (train, held)
