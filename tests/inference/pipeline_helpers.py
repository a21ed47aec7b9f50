"""A tiny but real IMoE run folder for pipeline tests, built in a few seconds.

Three synthetic domains with disjoint vocabularies (code, legal, chat); a BPE tokenizer trained
on them; a router fitted with the real ``fit_router`` (learned encoder, 3 categories); one
expert per category (``expert_lm``, briefly trained on its category's documents with the shared
loop, so their drafts are in their domain's words); a summarizer (``summarizer_lm``, untrained:
the pipeline contract does not depend on its quality: 40 steps on draft-less fusion sequences so its
answers vary) with a ``code`` LoRA adapter whose B is
non-zero (so the adapter visibly changes answers); an intent head fitted on the summarizer's
pooled prompt states (code vs other). Everything is saved and described by ``taskmoe.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.manifest import Manifest, Thresholds
from taskmoe.models.builders import expert_lm, summarizer_lm
from taskmoe.models.checkpoint import save_lm
from taskmoe.models.config import ConvConfig, ExpertLMConfig, LinearAttentionConfig, SSMConfig, SummarizerLMConfig
from taskmoe.layers.lora import inject, lora_layers, save_adapter
from taskmoe.router.classifier import ClassifierConfig
from taskmoe.router.clustering import ClusteringConfig
from taskmoe.router.encoders import LearnedEncoderConfig
from taskmoe.router.fit import RouterConfig, fit_router
from taskmoe.summarizer.fuser import FusionFormat
from taskmoe.summarizer.intent import IntentClassifier, pooled_hidden
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train

RNG = np.random.default_rng(0)
CODE_WORDS = "def return import class self lambda yield print range len dict list append value index".split()
LEGAL_WORDS = "licensee licensor warranty shall agreement party liability clause herein consent court damages".split()
CHAT_WORDS = "hello thanks weekend movie coffee friend sunny happy tired lunch music party tonight".split()
DOMAINS = {"code": CODE_WORDS, "legal": LEGAL_WORDS, "chat": CHAT_WORDS}


def domain_text(words: list[str], n: int, rng: np.random.Generator) -> str:
    return " ".join(rng.choice(words, size=n))


def texts(n: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    return {d: [domain_text(w, int(rng.integers(30, 60)), rng) for _ in range(n)] for d, w in DOMAINS.items()}


class LMData(torch.utils.data.Dataset):
    def __init__(self, seqs: list[list[int]], length: int = 24) -> None:
        self.rows = [s[i : i + length + 1] for s in seqs for i in range(0, max(1, len(s) - length), length)]
        self.rows = [r for r in self.rows if len(r) == length + 1]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(self.rows[i])


def lm_loss(model, batch):
    logits = model(batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)), {}


def build_run(root: Path, *, summarizer: bool = True, t_C_base: float = 0.5, t_CT: float = 0.05,
              pipeline: dict | None = None) -> Path:
    """Write a tiny trained system to ``root`` and return it."""
    torch.manual_seed(0)
    train_t, val_t = texts(24, 0), texts(8, 1)
    tok = Tokenizer.train([t for v in train_t.values() for t in v], vocab_size=320, show_progress=False)
    tok.save(root / "tokenizer.json")
    enc = lambda ts: tok.encode_batch(ts, allow_special=False)  # noqa: E731
    tr_ids = [s for v in train_t.values() for s in enc(v)]
    va_ids = [s for v in val_t.values() for s in enc(v)]
    V, D = tok.vocab_size, 32
    rcfg = RouterConfig(
        learned=LearnedEncoderConfig(vocab_size=V, d_model=D, span_min=4, span_max=24, batch_size=16, steps=40, lr=1e-2),
        clustering=ClusteringConfig(n_categories=3, n_init=2),
        classifier=ClassifierConfig(hidden=16, epochs=20, replay_per_category=16),
    )
    tcfg = lambda steps, lr: TrainConfig(max_steps=steps, batch_size=8, lr=lr, warmup_steps=2, progress=False,  # noqa: E731
                                         save_every=0, eval_every=0)
    router = fit_router(tr_ids, va_ids, rcfg, trainer=lambda m, f, d: train(m, f, d, tcfg(d.steps, 1e-2)), tokenizer=tok)
    router.save(root / "router")
    emb = router.embedding
    emb.requires_grad_(False)
    cfg = ExpertLMConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, conv=ConvConfig(levels=2),
                         attention=LinearAttentionConfig(chunk_size=8))
    scfg = SummarizerLMConfig(**cfg.base().to_dict(), ssm=SSMConfig(state=4))
    labels = [d.top for d in router.route_batch(tr_ids)]
    experts = {}
    for k in range(router.n_categories):
        torch.manual_seed(k)
        m = expert_lm(cfg, emb)
        mine = [s for s, c in zip(tr_ids, labels) if c == k] or tr_ids
        train(m, lm_loss, LMData(mine), tcfg(30, 1e-2))
        save_lm(m.eval(), root / "experts" / f"c{k}", kind="expert", include_embedding=False)
        experts[str(k)] = f"experts/c{k}"
    adapters = {}
    if summarizer:
        torch.manual_seed(7)
        s = summarizer_lm(scfg, emb)
        fmt = FusionFormat(tok)
        fused = [fmt.build(x[:12], [], x[12:40]).ids for x in tr_ids]  # prompt -> continuation, no drafts
        train(s, lm_loss, LMData(fused), tcfg(40, 1e-2))  # a little fusion training, so answers are not constant
        s.eval()
        save_lm(s, root / "summarizer", kind="summarizer", include_embedding=False)
        inject(s, ["in_proj"], rank=4, alpha=8.0, adapter_name="code")
        with torch.no_grad():
            for layer in lora_layers(s).values():
                layer.lora_B["code"].normal_(0.0, 0.5)
        save_adapter(s, root / "summarizer" / "adapters" / "code", "code")
        adapters["code"] = "summarizer/adapters/code"
        heads = [[fmt.sp["<|bos|>"], fmt.sp["<|user|>"], *x[:12]] for x in tr_ids]
        lab = ["code" if i < len(train_t["code"]) else "other" for i in range(len(tr_ids))]
        s.eval()
        from taskmoe.layers.lora import use_adapter

        with use_adapter(s, None):
            feats = pooled_hidden(s, heads, pad_id=tok.pad_id)
        IntentClassifier(["code", "other"], D, C=1.0).fit(feats, lab).save(root / "summarizer" / "intent")
    Manifest(
        tokenizer="tokenizer.json", router="router", experts=experts, summarizer="summarizer" if summarizer else None,
        adapters=adapters, thresholds=Thresholds(t_C_base=t_C_base, k=4.0, t_CT=t_CT), vocab_size=V, d_model=D,
        meta={"pipeline": {"draft_tokens": 8, "max_new_tokens": 8, "max_len": 128, **(pipeline or {})}},
    ).save(root)
    return root


def prompts() -> dict[str, str]:
    rng = np.random.default_rng(5)
    return {d: domain_text(w, 10, rng) for d, w in DOMAINS.items()}


def variant(run: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the run folder whose manifest has ``changes`` applied (``meta`` merges into meta.pipeline)."""
    dst = tmp_path / "variant"
    shutil.copytree(run, dst)
    m = json.loads((dst / "taskmoe.json").read_text())
    meta = changes.pop("meta", None)
    m.update(changes)
    if meta:
        m["meta"]["pipeline"].update(meta)
    (dst / "taskmoe.json").write_text(json.dumps(m))
    return dst
