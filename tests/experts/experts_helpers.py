"""A tiny real run folder for the experts tests: a 3-domain text corpus, a BPE tokenizer and a
fitted router with a learned (shared) embedding table.

Domains are written from disjoint word lists with fixed sentence templates, so a router separates
them and a small LM learns them in a few steps. Everything is seeded: the same run every time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from taskmoe.data.corpus import Corpus, Document
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.models.config import ConvConfig, ExpertLMConfig, LinearAttentionConfig
from taskmoe.router.classifier import ClassifierConfig
from taskmoe.router.clustering import ClusteringConfig
from taskmoe.router.encoders import LearnedEncoderConfig
from taskmoe.router.fit import RouterConfig, fit_router
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train

LEGAL = (["licensee", "licensor", "agreement", "warranty", "liability", "party", "notice", "court", "clause"],
         ["shall", "must", "may not", "will"], ["terminate", "indemnify", "disclose", "assign", "waive"])
CODE = (["x", "y", "total", "count", "value", "item", "index", "result"], ["+", "-", "*", "//"],
        ["append", "sort", "update", "clear", "extend"])
CHAT = (["weekend", "dinner", "movie", "garden", "trip", "coffee", "dog", "music"],
        ["great", "lovely", "busy", "fun", "quiet"], ["hello", "hey", "hi there", "good morning"])


def _legal(r: random.Random) -> str:
    a, v, b = r.choice(LEGAL[0]), r.choice(LEGAL[1]), r.choice(LEGAL[2])
    return f"The {a} {v} {b} the {r.choice(LEGAL[0])} under this {r.choice(LEGAL[0])} with written notice."


def _code(r: random.Random) -> str:
    a, op, m = r.choice(CODE[0]), r.choice(CODE[1]), r.choice(CODE[2])
    return f"def f_{a}({a}):\n    {a} = {a} {op} {r.randint(1, 9)}\n    items.{m}({a})\n    return {a}\n"


def _chat(r: random.Random) -> str:
    g, t, adj = r.choice(CHAT[2]), r.choice(CHAT[0]), r.choice(CHAT[1])
    return f"A: {g}, how was the {t}?\nB: the {t} was {adj}, thanks!\n"


WRITERS = {"legal": _legal, "code": _code, "conversation": _chat}


def documents(per_domain: int = 40, seed: int = 0) -> list[dict[str, str]]:
    r = random.Random(seed)
    out = []
    for i in range(per_domain):
        for dom, w in WRITERS.items():
            out.append({"text": " ".join(w(r) for _ in range(r.randint(8, 14))), "domain": dom, "id": f"{dom}-{i}"})
    return out


def corpus(per_domain: int = 40, seed: int = 0) -> Corpus:
    return Corpus.from_chunks([Document(text=d["text"], domain=d["domain"], source="test") for d in documents(per_domain, seed)])


def write_jsonl(path: Path, per_domain: int = 40, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in documents(per_domain, seed)))
    return path


def trainer(model, loss_fn, data):
    cfg = TrainConfig(max_steps=data.steps, batch_size=data.batch_size, lr=5e-3, warmup_steps=2, progress=False,
                      save_every=0, eval_every=0)
    return train(model, loss_fn, data, cfg)


def make_run(run: Path, c: Corpus | None = None, *, n_categories: int = 3, d_model: int = 32, steps: int = 30) -> Path:
    """``run/router`` (with its tokenizer.json) fitted on ``c`` (default :func:`corpus`)."""
    torch.manual_seed(0)
    c = c or corpus()
    tok = Tokenizer.train([d.text for d in c.train], vocab_size=400)
    ids = tok.encode_batch([d.text for d in c.train], allow_special=False)
    val = tok.encode_batch([d.text for d in c.validation], allow_special=False)
    cfg = RouterConfig(
        learned=LearnedEncoderConfig(d_model=d_model, span_min=8, span_max=48, batch_size=32, steps=steps, temperature=0.1),
        clustering=ClusteringConfig(n_categories=n_categories, n_init=2),
        classifier=ClassifierConfig(hidden=32, epochs=20, replay_per_category=50),
    )
    router = fit_router(ids, val, cfg, trainer=trainer, tokenizer=tok)
    router.save(run / "router")
    return run


def tiny_lm(**kw) -> ExpertLMConfig:
    return ExpertLMConfig(**{"n_layers": 2, "n_heads": 2, "conv": ConvConfig(levels=2),
                             "attention": LinearAttentionConfig(chunk_size=16), **kw})
