"""The serving decode adapter: serving ``Row``s map onto ``inference.generate.generate_rows`` --
per-row settings and seeds, ``emit`` halting, finish reasons, the seed trace, tiny temperature."""

from __future__ import annotations

import torch

from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.models import ExpertLMConfig, LinearAttentionConfig, expert_lm
from taskmoe.serving.backend import Row, SamplingParams
from taskmoe.serving.backends.decode import decode_rows

PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8], [9, 9], [3, 1, 4, 1, 5]]


def _model():
    torch.manual_seed(0)
    return expert_lm(ExpertLMConfig(vocab_size=41, d_model=32, n_layers=2, n_heads=2, init_std=0.3,
                                    attention=LinearAttentionConfig(chunk_size=4))).eval()


def test_rows_equal_alone_with_finish_reasons_and_halting() -> None:
    model = _model()
    params = [SamplingParams(6, 0.0), SamplingParams(5, 0.9, 0.8, 7), SamplingParams(6, 1e-300, 5e-324, 8),
              SamplingParams(4, 1.2, 1.0, 9), SamplingParams(6, 0.0)]
    stop = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=6, temperature=0.0))[0][2]
    halted: list[int] = []

    def halt_after_two(tok: int) -> bool:
        halted.append(tok)
        return len(halted) < 2

    rows = [Row(p, s) for p, s in zip(PROMPTS, params)]
    rows[3] = Row(PROMPTS[3], params[3], emit=halt_after_two)
    out = decode_rows(model, rows, stop_ids=[stop])
    for i, (p, s, o) in enumerate(zip(PROMPTS, params, out)):
        temperature = 0.0 if s.temperature < 1e-3 else s.temperature
        alone = generate(model, [p], GenerationConfig(max_new_tokens=s.max_tokens, temperature=temperature,
                                                      top_p=s.top_p, stop_tokens=[stop], seed=s.seed))[0]
        want = alone[:2] if i == 3 else alone
        assert o.token_ids == want, i
        assert o.finish == ("halted" if i == 3 else "length" if len(alone) == s.max_tokens else "eos"), i
        assert o.trace["batch_rows"] == 5 and (s.seed is None or o.trace["seed"] == s.seed)
    assert out[0].finish == "eos" and len(out[0].token_ids) == 2  # its own greedy output hit the stop id
    assert halted == out[3].token_ids


def test_unseeded_rows_report_the_seed_that_reproduces_them() -> None:
    model = _model()
    out = decode_rows(model, [Row(PROMPTS[1], SamplingParams(5, 1.0))])[0]
    again = decode_rows(model, [Row(PROMPTS[1], SamplingParams(5, 1.0, 1.0, out.trace["seed"]))])[0]
    assert again.token_ids == out.token_ids and len(out.token_ids) == 5
    assert decode_rows(model, []) == []
