"""Row-conditioned decoding: a per-row adapter mask and per-row ensemble weights, handed to generate as
side data, survive its length grouping and row dropping, and equal running each kind of row on its own
(identical prompts may carry different side data: nothing is looked up by prompt)."""

from __future__ import annotations

import pytest
import torch

from taskmoe.errors import ConfigError
from taskmoe.experts.ensemble import mixture_logprobs
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.inference.rowwise import AdapterRowsLM, EnsembleLM
from taskmoe.models import ConvConfig, ExpertLMConfig, LinearAttentionConfig, SSMConfig, SummarizerLMConfig, expert_lm, summarizer_lm
from taskmoe.layers.lora import inject, lora_layers, use_adapter

CFG = ExpertLMConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, init_std=0.3, conv=ConvConfig(levels=2),
                     attention=LinearAttentionConfig(chunk_size=4))
SCFG = SummarizerLMConfig(**CFG.base().to_dict(), ssm=SSMConfig(state=4))
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 3, 3], [7, 1, 7, 1, 7, 1], [2, 2]]
GREEDY = GenerationConfig(max_new_tokens=7, temperature=0.0, repetition_penalty=1.3, stop_tokens=[5])


@pytest.fixture(scope="module")
def summ():
    torch.manual_seed(0)
    m = summarizer_lm(SCFG).eval()
    inject(m, ["in_proj", "out_proj"], rank=2, alpha=4.0, adapter_name="code")
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B["code"].normal_(0.0, 0.5)
    return m


def test_adapter_mask_follows_rows(summ) -> None:
    use = [True, False, True, False, False, True]
    mixed = generate(AdapterRowsLM(summ, "code"), PROMPTS, GREEDY, side=use)
    with use_adapter(summ, "code"):
        on = generate(summ, PROMPTS, GREEDY)
    with use_adapter(summ, None):
        off = generate(summ, PROMPTS, GREEDY)
    assert mixed == [a if u else b for u, a, b in zip(use, on, off)]
    assert on != off  # the adapter matters, so the test can fail
    assert any(len(r) < GREEDY.max_new_tokens for r in mixed)  # some rows stopped early (rows were dropped)
    # the shared model is left as it was found
    assert all(layer.row_mask is None for layer in lora_layers(summ).values())


def test_identical_prompts_may_differ_and_side_data_is_required(summ) -> None:
    same = [[1, 2, 3]] * 2
    got = generate(AdapterRowsLM(summ, "code"), same, GREEDY, side=[True, False])
    with use_adapter(summ, "code"):
        on = generate(summ, same[:1], GREEDY)[0]
    with use_adapter(summ, None):
        off = generate(summ, same[:1], GREEDY)[0]
    assert got == [on, off] and on != off
    with pytest.raises(ConfigError, match="no adapter 'poetry'"):
        AdapterRowsLM(summ, "poetry")
    with pytest.raises(ConfigError, match="asks for an adapter but none was named"):
        generate(AdapterRowsLM(summ, None), [[1]], GREEDY, side=[True])
    m = AdapterRowsLM(summ, "code")
    with pytest.raises(ConfigError, match="side data"):
        generate(m, [[1, 2]], GREEDY)
    with pytest.raises(ConfigError, match="decoding wrapper"):
        m(torch.tensor([[1, 2]]))


def test_ensemble_is_the_per_row_mixture() -> None:
    torch.manual_seed(1)
    experts = [expert_lm(CFG).eval() for _ in range(3)]
    w = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    got = generate(EnsembleLM(experts), PROMPTS, GREEDY, side=list(w))
    for p, wi, out in list(zip(PROMPTS, w, got))[:4]:
        seq, ref = list(p), []
        with torch.no_grad():
            for _ in range(GREEDY.max_new_tokens):  # full forward each step, mixture by hand
                lp = mixture_logprobs(torch.stack([m(torch.tensor([seq])).logits[0, -1] for m in experts]), wi)
                seen = torch.zeros_like(lp, dtype=torch.bool)
                seen[torch.tensor(seq)] = True
                lp = torch.where(seen, torch.where(lp > 0, lp / 1.3, lp * 1.3), lp)
                t = int(lp.argmax())
                if t == 5:
                    break
                ref.append(t)
                seq.append(t)
        assert out == ref
    # weight 1 on one expert == that expert alone
    one = generate(EnsembleLM(experts), PROMPTS, GREEDY.replace(repetition_penalty=1.0),
                   side=[torch.tensor([0.0, 1.0, 0.0])] * len(PROMPTS))
    assert one == generate(experts[1], PROMPTS, GREEDY.replace(repetition_penalty=1.0))
