"""Synthetic token-id corpora for router tests: topics with their own vocabulary bands.

Vocabulary (V = 230): ids 0..11 are "special" (never emitted), 12..19 are shared function
words, topic ``t`` (0..4) owns the band ``[20 + 40 t, 60 + 40 t)``, and ids 220..229 are never
emitted (unknown to any router fitted on these corpora). A document of topic ``t`` draws
each token as a function word (p = 0.35), a word of its own band (Zipf-like), or, with
probability ``noise``, a word of another topic's band.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmoe.router.encoders import SpanPairs
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train

V = 230
UNSEEN = list(range(220, 230))
SPECIAL = list(range(12))
BAND = 40


def topic_docs(topic: int, n: int, seed: int, noise: float = 0.1, lengths: tuple[int, int] = (40, 150)) -> list[list[int]]:
    rng = np.random.default_rng([seed, topic])
    zipf = 1.0 / np.arange(1, BAND + 1)
    zipf /= zipf.sum()
    docs = []
    for _ in range(n):
        L = int(rng.integers(*lengths))
        kind = rng.choice(3, size=L, p=[0.35, 1 - 0.35 - noise, noise])
        own = 20 + BAND * topic + rng.choice(BAND, size=L, p=zipf)
        other_topic = rng.integers(0, 5, size=L)
        other = 20 + BAND * other_topic + rng.choice(BAND, size=L, p=zipf)
        func = rng.integers(12, 20, size=L)
        docs.append(np.where(kind == 0, func, np.where(kind == 1, own, other)).tolist())
    return docs


def corpus(topics: list[int], n: int, seed: int = 0, **kw) -> tuple[list[list[int]], list[int]]:
    docs, labels = [], []
    for t in topics:
        d = topic_docs(t, n, seed, **kw)
        docs += d
        labels += [t] * len(d)
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order], [labels[i] for i in order]


def loop_trainer(lr: float = 5e-3):
    """The shared loop as a router Trainer (like the recipe's, without output folder)."""

    def run(model: torch.nn.Module, loss_fn, data: SpanPairs):
        cfg = TrainConfig(max_steps=data.steps, batch_size=data.batch_size, lr=lr, warmup_steps=max(1, data.steps // 20),
                          progress=False, save_every=0, eval_every=0)  # fmt: skip
        return train(model, loss_fn, data, cfg)

    return run


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (the machine is shared; tiny models gain nothing from two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
