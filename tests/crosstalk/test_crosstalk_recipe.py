"""The cross-talk recipe's pieces: prompt windows, pair selection, discriminator features, the
perplexity of rollouts (checked against the log-probabilities recorded while sampling), the plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from crosstalk_helpers import V, tiny_expert
from taskmoe.crosstalk.dialogue import DialogueConfig, DialogueTokens
from taskmoe.crosstalk.discriminator import Discriminator
from taskmoe.crosstalk.gan import CrosstalkGAN, GANConfig, attach_adapter
from taskmoe.errors import ConfigError, DataError
from taskmoe.training.recipes.crosstalk import (
    CrosstalkPrompts,
    CrosstalkRecipeConfig,
    collect_rollouts,
    cut_prompts,
    discriminator_setup,
    pair_prompts,
    plot_curves,
    rollout_perplexity,
)


def test_cut_prompts() -> None:
    docs = [list(range(1, 11)), [20, 21]]
    # P = 4: BOS + 3 tokens per window, non-overlapping; the 2-token document gives none
    prompts, doc = cut_prompts(docs, 0, 4, limit=10)
    assert prompts == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7, 8, 9]] and doc == [0, 0, 0]
    # limit 2 of 3 windows: evenly spaced (indices int(0 * 1.5), int(1 * 1.5)) = 0, 1
    assert cut_prompts(docs, 0, 4, limit=2)[0] == [[0, 1, 2, 3], [0, 4, 5, 6]]


def test_pair_prompts_keeps_the_pair_and_picks_the_opener() -> None:
    conf = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.45, 0.35], [0.3, 0.3, 0.4]])
    ds = pair_prompts([[1, 2]] * 4, conf, (2, 1))  # pair = (category 2, category 1)
    # rows 1 (top 2), 2 (top 1), 3 (top 2) are kept; row 0's top category 0 is not in the pair
    assert len(ds) == 3
    assert ds.first.tolist() == [0, 1, 0]  # the pair member with the higher confidence opens
    assert torch.allclose(ds.confidences, torch.tensor([[0.7, 0.2], [0.35, 0.45], [0.4, 0.3]]))
    with pytest.raises(DataError, match="one length"):
        CrosstalkPrompts([[1, 2], [1]], [0, 1], [(0.5, 0.5)] * 2)
    with pytest.raises(DataError, match="no prompts"):
        CrosstalkPrompts([], [], [])


def test_discriminator_features_and_config() -> None:
    experts = [tiny_expert(1), tiny_expert(2)]
    cfg, table = discriminator_setup(experts, CrosstalkRecipeConfig())
    assert (cfg.vocab_size, cfg.feature_dim) == (V, 64) and table.shape == (V, 64)
    own, none = discriminator_setup(experts, CrosstalkRecipeConfig(features="own"))
    assert own.feature_dim == 0 and none is None
    Discriminator(cfg, table)
    with pytest.raises(ConfigError, match="features"):
        CrosstalkRecipeConfig(features="router")
    rt = CrosstalkRecipeConfig.from_dict(CrosstalkRecipeConfig().to_dict())
    assert rt == CrosstalkRecipeConfig()


def test_rollout_perplexity_matches_the_sampled_logprobs() -> None:
    gcfg = GANConfig(dialogue=DialogueConfig(max_new_tokens=12, n_turns=3, segment_tokens=4, min_segment_tokens=2,
                                             temperature=1.0), opening_min=3, opening_max=3, lora_rank=2)
    experts = [tiny_expert(1), tiny_expert(2)]
    for m in experts:
        attach_adapter(m, gcfg)
    cfg, table = discriminator_setup(experts, CrosstalkRecipeConfig())
    gan = CrosstalkGAN(experts, ["a", "b"], Discriminator(cfg, table), gcfg, DialogueTokens())
    data = CrosstalkPrompts([[1, 2, 3]] * 6, [0] * 6, [(0.5, 0.5)] * 6)  # expert 0 opens every text
    ro = collect_rollouts(gan, data, batch_size=4, seed=0)
    assert [len(r.real) for r in ro] == [4, 2]
    # the uninterrupted texts were sampled from expert 0 at T = 1: its perplexity after the opening is
    # exp(-mean of the log-probabilities recorded while sampling)
    lps = [lp for r in ro for t in r.real for lp in t.logprobs[r.opening :]]
    assert rollout_perplexity(experts[0], ro, interrupted=False) == pytest.approx(math.exp(-sum(lps) / len(lps)), rel=1e-4)
    assert rollout_perplexity(experts[1], ro, interrupted=False) != pytest.approx(math.exp(-sum(lps) / len(lps)), rel=1e-2)


def test_plot_curves(tmp_path) -> None:
    recs = [{"kind": "train", "step": s, "d_acc": 0.5 + s / 40, "reward": -s / 20, "baseline": -s / 30} for s in range(1, 11)]
    recs.append({"kind": "eval", "step": 10, "eval_d_acc": 0.7})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = plot_curves(tmp_path / "m.jsonl", tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no training records"):
        plot_curves(tmp_path / "e.jsonl", tmp_path / "d.png")
