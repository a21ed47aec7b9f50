"""Generation: batch == each row alone, == a no-cache reference loop, determinism, stops, streaming,
and per-row configs/generators/halting (mixed batch == each row alone)."""

from __future__ import annotations

import pytest
import torch

from taskmoe.errors import ConfigError, RequestError
from taskmoe.inference.generate import GenerationConfig, RowOutput, generate, generate_rows, stream, stream_rows
from taskmoe.models import ExpertLMConfig, LinearAttentionConfig, expert_lm, summarizer_lm, transformer_lm

BUILDERS = [expert_lm, summarizer_lm, transformer_lm]
CFG = ExpertLMConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=2, init_std=0.3, attention=LinearAttentionConfig(chunk_size=4))
"""The expert's config; the other builders take its shared fields (:meth:`LMConfig.coerce`)."""
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [3, 3, 3], [7, 1, 7, 1, 7, 1, 7]]


@pytest.fixture(scope="module", params=BUILDERS, ids=lambda b: b.__name__)
def model(request):
    torch.manual_seed(0)
    return request.param(CFG).eval()


def _reference_greedy(model, prompt, n, penalty=1.0):
    """Recompute the whole sequence at every step (no state) and take the penalized argmax."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[torch.tensor(seq)] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


def test_greedy_batch_equals_rows_alone_and_reference(model) -> None:
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0, repetition_penalty=1.5)
    batched = generate(model, PROMPTS, cfg)
    assert batched == [generate(model, [p], cfg)[0] for p in PROMPTS]
    assert batched == [_reference_greedy(model, p, 8, 1.5) for p in PROMPTS]
    assert len({tuple(r) for r in batched}) > 1  # not a degenerate constant output


def test_seeded_sampling_is_deterministic(model) -> None:
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.95, seed=123)
    a, b = generate(model, PROMPTS, cfg), generate(model, PROMPTS, cfg)
    assert a == b
    assert generate(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(123)) == a
    assert generate(model, PROMPTS, cfg.replace(seed=124)) != a


def test_stop_tokens_end_rows_without_disturbing_others(model) -> None:
    base = GenerationConfig(max_new_tokens=8, temperature=0.0)
    free = generate(model, PROMPTS, base)
    stop = free[1][3]  # row 1 stops at its 4th token
    stopped = generate(model, PROMPTS, base.replace(stop_tokens=[stop]))
    for row, out in zip(free, stopped):
        cut = row.index(stop) if stop in row else len(row)
        assert out == row[:cut]
    assert stopped[1] == free[1][: free[1].index(stop)]


def test_stream_matches_generate_and_leaves_no_global_mode(model) -> None:
    cfg = GenerationConfig(max_new_tokens=5, temperature=0.7, seed=1)
    model.train()
    got: list[list[int]] = [[] for _ in PROMPTS]
    for row, tok in stream(model, PROMPTS, cfg):
        assert not torch.is_inference_mode_enabled()  # inference mode never spans a yield
        got[row].append(tok)
    assert model.training  # mode restored
    model.eval()
    assert got == generate(model, PROMPTS, cfg)
    assert all(len(r) == 5 for r in got)


def test_limits_and_errors(model) -> None:
    assert generate(model, PROMPTS, GenerationConfig(max_new_tokens=0)) == [[] for _ in PROMPTS]
    with pytest.raises(RequestError, match="prompt 1 is empty"):
        generate(model, [[1], []])
    with pytest.raises(RequestError, match=r"prompt 0 has token ids outside \[0, 53\): \[99\]"):
        generate(model, [[1, 99]])
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(top_p=0.0)


# Mixed per-row settings: greedy (0 and a tiny temperature that would overflow logits / T),
# sampling with top-k / top-p / penalty, a degenerate top_p, different lengths, stops and seeds.
MIXED = [
    GenerationConfig(max_new_tokens=8, temperature=0.0, repetition_penalty=1.5),
    GenerationConfig(max_new_tokens=5, temperature=1.0, top_k=20, seed=11),
    GenerationConfig(max_new_tokens=9, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=12),
    GenerationConfig(max_new_tokens=3, temperature=1e-300),
    GenerationConfig(max_new_tokens=7, temperature=1.3, top_p=5e-324, seed=13),
    GenerationConfig(max_new_tokens=0, temperature=1.0, seed=14),
]


def test_mixed_per_row_configs_equal_each_row_alone(model) -> None:
    prompts = PROMPTS + [[2, 2], [9, 8, 7]]
    cfgs = MIXED[:3] + [c.replace(stop_tokens=[5, 9]) for c in MIXED[3:]] + [MIXED[1].replace(seed=99)]
    got = generate_rows(model, prompts, cfgs)
    alone = [generate(model, [p], c)[0] for p, c in zip(prompts, cfgs)]
    assert [o.tokens for o in got] == alone
    assert got[5] == RowOutput([], "length")
    for o, c in zip(got, cfgs):
        assert o.finish == ("length" if len(o.tokens) == c.max_new_tokens else "stop")
        assert len(o.tokens) <= c.max_new_tokens and not set(o.tokens) & set(c.stop_tokens)
    # tiny temperature is greedy; a top_p that rounds to 0 keeps (only) the argmax
    assert got[3].tokens == generate(model, [prompts[3]], cfgs[3].replace(temperature=0.0))[0]
    assert got[4].tokens == generate(model, [prompts[4]], cfgs[4].replace(temperature=0.0, seed=None))[0]
    # sampled rows really sample: another seed changes them
    other = generate_rows(model, prompts[1:3], [c.replace(seed=c.seed + 100) for c in cfgs[1:3]])
    assert [o.tokens for o in other] != [o.tokens for o in got[1:3]]


def test_emit_halts_only_its_row(model) -> None:
    cfgs = [MIXED[0], MIXED[1], MIXED[2], MIXED[0], MIXED[2]]
    free = generate_rows(model, PROMPTS, cfgs)
    seen: list[list[int]] = [[] for _ in PROMPTS]

    def emit_for(i: int, limit: int):
        def emit(tok: int) -> bool:
            seen[i].append(tok)
            return len(seen[i]) < limit
        return emit

    limits = [3, 99, 2, 99, 1]
    got = generate_rows(model, PROMPTS, cfgs, emits=[emit_for(i, n) for i, n in enumerate(limits)])
    for i, (f, g, n) in enumerate(zip(free, got, limits)):
        assert g.tokens == seen[i] == f.tokens[:n]  # halted rows keep the token that halted them
        assert g.finish == ("halted" if n <= len(f.tokens) else f.finish)


def test_shared_generator_rows_draw_together_like_stream(model) -> None:
    """``stream`` is ``stream_rows`` with one config and one generator object for every row."""
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.9, top_k=10)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert list(stream_rows(model, PROMPTS, [cfg] * len(PROMPTS), generators=[g1] * len(PROMPTS))) == \
        list(stream(model, PROMPTS, cfg, g2))


def test_per_row_arguments_are_checked(model) -> None:
    with pytest.raises(RequestError, match="2 prompts but 1 cfgs"):
        generate_rows(model, [[1], [2]], [GenerationConfig()])
    with pytest.raises(RequestError, match="2 prompts but 3 emits"):
        generate_rows(model, [[1], [2]], [GenerationConfig()] * 2, emits=[None] * 3)
    with pytest.raises(TypeError, match=r"unknown per-row option\(s\) \['emit'\]"):  # a typo is not ignored
        generate_rows(model, [[1]], [GenerationConfig()], emit=[None])
