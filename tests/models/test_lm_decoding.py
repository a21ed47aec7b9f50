"""Cached / recurrent decoding equals a full parallel forward, for every builder and LA variant."""

from __future__ import annotations

import pytest
import torch

from taskmoe.layers import LMState
from taskmoe.models import expert_lm, summarizer_lm, transformer_lm
from taskmoe.models.config import ExpertLMConfig, LinearAttentionConfig, LMConfig, SSMConfig, SummarizerLMConfig
from taskmoe.models.config import TransformerLMConfig

BUILDERS = [expert_lm, summarizer_lm, transformer_lm]
TOL = dict(rtol=1e-4, atol=1e-5)


BASE = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, init_std=0.2)


def _cfg(builder=expert_lm, **attention) -> LMConfig:
    """Each builder's own config: chunk 8 linear attention (+ ``attention`` overrides), a chunk-5 scan."""
    if builder is expert_lm:
        return ExpertLMConfig(**BASE, attention=LinearAttentionConfig(chunk_size=8, **attention))
    if builder is summarizer_lm:
        return SummarizerLMConfig(**BASE, ssm=SSMConfig(chunk=5))
    return TransformerLMConfig(**BASE)


def _incremental(model, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Feed ids in pieces of the given lengths (the rest one token at a time) through the state."""
    state, outs, t = model.init_state(ids.shape[0]), [], 0
    for n in pieces + [1] * (ids.shape[1] - sum(pieces)):
        out = model(ids[:, t : t + n], state)
        outs.append(out.logits)
        state, t = out.state, t + n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("pieces", [[13], [5, 9, 3], []], ids=["prefill+steps", "chunked-prefill", "all-steps"])
def test_state_decoding_equals_full_forward(builder, pieces) -> None:
    model = builder(_cfg(builder)).eval()
    ids = torch.randint(0, 61, (3, 29))
    with torch.no_grad():
        full = model(ids)
        inc = _incremental(model, ids, pieces)
    assert full.state is None
    torch.testing.assert_close(inc, full.logits, **TOL)


@pytest.mark.parametrize("variant", [
    dict(decay="none", feature_map="elu1", normalize=True),
    dict(decay="fixed", feature_map="identity"),
    dict(decay="data", feature_map="elu1", normalize=True),
], ids=["elu1-normalized", "retnet-fixed", "data-gated-normalized"])
def test_expert_variants_decode_exactly(variant) -> None:
    model = expert_lm(_cfg(expert_lm, **variant)).eval()
    ids = torch.randint(0, 61, (2, 25))
    with torch.no_grad():
        torch.testing.assert_close(_incremental(model, ids, [10]), model(ids).logits, **TOL)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_merged_ragged_states_equal_rows_alone(builder) -> None:
    """States prefilled at different lengths, concatenated, then stepped together == each row alone."""
    model = builder(_cfg(builder)).eval()
    a, b = torch.randint(0, 61, (2, 7)), torch.randint(0, 61, (1, 12))
    nxt = torch.randint(0, 61, (3, 4))
    with torch.no_grad():
        sa, sb = model(a, model.init_state(2)).state, model(b, model.init_state(1)).state
        state = LMState.cat([sa, sb])
        merged = []
        for t in range(4):
            out = model(nxt[:, t : t + 1], state)
            merged.append(out.logits)
            state = out.state
        merged = torch.cat(merged, 1)
        alone_a = model(torch.cat([a, nxt[:2]], 1)).logits[:, -4:]
        alone_b = model(torch.cat([b, nxt[2:]], 1)).logits[:, -4:]
    torch.testing.assert_close(merged, torch.cat([alone_a, alone_b]), **TOL)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_select_and_clone(builder) -> None:
    model = builder(_cfg(builder)).eval()
    ids = torch.randint(0, 61, (3, 9))
    nxt = torch.randint(0, 61, (3, 1))
    with torch.no_grad():
        state = model(ids, model.init_state(3)).state
        branch = state.clone()
        sel = model(nxt[[2, 0]], state.select(torch.tensor([2, 0]))).logits
        full = model(torch.cat([ids, nxt], 1)).logits[:, -1:]
        torch.testing.assert_close(sel, full[[2, 0]], **TOL)
        # the clone is unaffected by stepping the original, and gives the same next logits
        torch.testing.assert_close(model(nxt, branch).logits, full, **TOL)


def test_logits_to_keep_and_hidden() -> None:
    model = expert_lm(_cfg()).eval()
    ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_to_keep=1)
    assert full.hidden.shape == (2, 11, 32) and last.logits.shape == (2, 1, 61)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    torch.testing.assert_close(full.logits, full.hidden @ model.embedding.weight.T)
