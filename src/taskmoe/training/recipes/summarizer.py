"""Summarizer recipe: fusion data -> expert drafts (cached) -> train the SSM summarizer; then the
coding LoRA adapter and the intent head. Thin setup/train/cleanup over the shared loop.

Steps (:func:`run` = :func:`setup` (1-3) -> :func:`train` (4-6) -> :func:`cleanup` (7)):

1. **Pairs** (:func:`taskmoe.summarizer.examples.fusion_pairs`): corpus documents -> (prompt,
   target) token ids: prefix -> true continuation, dialogue turn -> reply.
2. **Drafts** (:class:`taskmoe.summarizer.drafts.Drafter`): route every prompt, let the selected
   experts draft (grouped by expert, progress bar), cache the drafts as JSONL under
   ``<out>/drafts.jsonl`` keyed by prompt/expert/weights/settings hash.
3. **Fusion sequences** (:class:`taskmoe.summarizer.fuser.FusionFormat`): prompt + drafts (most
   confident first, confidence in the header) + answer; loss only on the answer.
4. **Train** the summarizer autoregressively (:func:`train_fusion`) with :func:`taskmoe.training.loop.train` and
   :func:`fusion_loss` (token cross-entropy on answer positions); save it with
   :func:`taskmoe.models.checkpoint.save_lm` *before* any adapter is injected, so the summarizer
   file holds the base weights only.
5. **Coding adapter**: inject LoRA (``adapter_targets``) as adapter ``code``, freeze everything
   else, train on the code-domain fusion sequences (same format as at inference), save it
   as its own folder with :func:`taskmoe.layers.lora.save_adapter`.
6. **Intent head**: fit :class:`taskmoe.summarizer.intent.IntentClassifier` on the summarizer's
   pooled hidden states of the fusion prompt head (``<|bos|><|user|> prompt``, adapter off:
   intent decides whether the adapter runs), labels from domains (code vs other); report its
   validation accuracy.
7. **Report**: validation answer perplexity with drafts, of the code domain with and without
   the adapter, intent accuracy; written to ``<out>/summarizer_report.json``.

Everything the recipe needs from other stages (router, expert store, generate, tokenizer, a
built summarizer) is passed in; the CLI / quickstart assemble them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from taskmoe.config import Config, check, check_min, doc
from taskmoe.errors import DataError
from taskmoe.eval.nll import batched, corpus_nll
from taskmoe.io import atomic_write_json
from taskmoe.layers.lora import inject, mark_only_adapter_trainable, save_adapter, use_adapter
from taskmoe.summarizer.drafts import DraftCache, Drafter, DraftSet
from taskmoe.summarizer.examples import FusionPair, fusion_pairs
from taskmoe.summarizer.fuser import FusedSequence, FusionFormat, collate
from taskmoe.summarizer.intent import IntentClassifier, domain_intents, pooled_hidden
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import TrainResult, train as train_loop
from taskmoe.training.losses import IGNORE_INDEX, lm_cross_entropy

__all__ = [
    "SummarizerRecipeConfig",
    "FusionDataset",
    "fusion_loss",
    "answer_perplexity",
    "build_sequences",
    "train_fusion",
    "train_code_adapter",
    "fit_intent",
    "FusionData",
    "setup",
    "train",
    "cleanup",
    "run",
]

ADAPTER = "code"


@dataclass
class SummarizerRecipeConfig(Config):
    """Data sizes, the fusion budget, and the two training runs (summarizer, coding adapter)."""

    prompt_tokens: int = doc(64, "tokens of prompt per fusion example (prefix kept nearest the cut)")
    target_tokens: int = doc(48, "tokens of target (true continuation / reply) per example")
    draft_tokens: int = doc(48, "new tokens each expert drafts")
    max_len: int = doc(512, "fusion sequence budget in tokens (drafts are cut to fit, never the prompt)")
    max_replies_per_doc: int = doc(2, "turn -> reply pairs taken from one dialogue")
    draft_batch_size: int = doc(16, "prompts per expert generate call")
    code_domain: str = doc("code", "corpus domain the coding adapter and the intent head's 'code' label use")
    adapter_targets: list[str] = doc(["in_proj", "out_proj"], "LoRA target module patterns in the summarizer")
    adapter_rank: int = doc(8, "LoRA rank r of the coding adapter")
    adapter_alpha: float = doc(16.0, "LoRA alpha (scale alpha / r)")
    adapter_dropout: float = doc(0.0, "dropout on the LoRA input during adapter training")
    intent_C: float = doc(1.0, "inverse L2 strength of the intent logistic regression")
    fine_tune_embedding: bool = doc(False, "train the summarizer's token embedding; by default it is the router's "
                                    "shared table, kept frozen and not stored in the summarizer folder")
    train: TrainConfig = doc(TrainConfig(max_steps=300, batch_size=8, lr=1e-3, warmup_steps=20, eval_every=100),
                             "training of the summarizer on fusion sequences")
    adapter_train: TrainConfig = doc(TrainConfig(max_steps=100, batch_size=8, lr=2e-3, warmup_steps=10, eval_every=50),
                                     "training of the coding adapter on code-domain fusion sequences")

    def validate(self) -> None:
        check_min(self, ("prompt_tokens", "target_tokens", "draft_tokens", "max_len", "max_replies_per_doc",
                         "draft_batch_size", "adapter_rank"), 1)
        check(self.prompt_tokens + self.target_tokens + 4 <= self.max_len,
              f"SummarizerRecipeConfig: prompt_tokens + target_tokens + 4 = "
              f"{self.prompt_tokens + self.target_tokens + 4} exceeds max_len {self.max_len}")
        check(bool(self.adapter_targets), "SummarizerRecipeConfig.adapter_targets must name at least one module pattern")
        check_min(self, ("intent_C",), strict=True)


# ------------------------------------------------------------------------------ data
class FusionDataset(torch.utils.data.Dataset):
    """Fusion sequences; ``collate`` right-pads (ids with pad, targets with -100)."""

    def __init__(self, seqs: Sequence[FusedSequence], pad_id: int, domains: Sequence[str | None] | None = None) -> None:
        if not seqs:
            raise DataError("FusionDataset: no fusion sequences (empty corpus split or every document too short)")
        self.seqs, self.pad_id = list(seqs), int(pad_id)
        self.domains = list(domains) if domains is not None else [None] * len(self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> FusedSequence:
        return self.seqs[i]

    def collate(self, items: list[FusedSequence]) -> dict[str, torch.Tensor]:
        return collate(items, self.pad_id)

    def subset(self, domain: str) -> "FusionDataset":
        keep = [i for i, d in enumerate(self.domains) if d == domain]
        if not keep:
            raise DataError(f"no fusion sequences of domain '{domain}' (domains present: {sorted(set(map(str, self.domains)))})")
        return FusionDataset([self.seqs[i] for i in keep], self.pad_id, [self.domains[i] for i in keep])


def build_sequences(pairs: Sequence[FusionPair], drafts: Sequence[DraftSet], fmt: FusionFormat, pad_id: int) -> FusionDataset:
    """Fusion sequences (prompt + drafts + answer) for ``pairs`` and their drafts."""
    if len(pairs) != len(drafts):
        raise DataError(f"{len(pairs)} pairs but {len(drafts)} draft sets")
    seqs = [fmt.build(p.prompt, d.drafts, p.target) for p, d in zip(pairs, drafts)]
    return FusionDataset(seqs, pad_id, [p.domain for p in pairs])


def fusion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token cross-entropy on answer positions (targets are -100 elsewhere)."""
    out = model(batch["input_ids"])
    loss = lm_cross_entropy(out.logits, batch["targets"])
    return loss, {"tokens": int((batch["targets"] != IGNORE_INDEX).sum())}


def answer_perplexity(model: nn.Module, data: FusionDataset, batch_size: int = 16) -> float:
    """exp(token-weighted mean answer cross-entropy) over the whole dataset."""
    forward = lambda b: (model(b["input_ids"]).logits, b["targets"])  # noqa: E731
    return corpus_nll(forward, batched(data, batch_size, data.collate), model=model).ppl


# ---------------------------------------------------------------------------- training
def train_fusion(model: nn.Module, data: FusionDataset, cfg: TrainConfig, *, eval_data: FusionDataset | None = None,
                 out_dir: str | Path | None = None, freeze_embedding: bool = True) -> TrainResult:
    """Train the summarizer LM on fusion sequences with the shared loop; the (shared) embedding stays
    frozen unless told otherwise. (The ``train summarizer`` command is
    :func:`taskmoe.training.recipes.summarizer_run.train_summarizer`.)"""
    emb = model.embedding.weight
    was = emb.requires_grad
    emb.requires_grad_(not freeze_embedding)
    try:
        return train_loop(model, fusion_loss, data, cfg, eval_data=eval_data, out_dir=out_dir)
    finally:
        emb.requires_grad_(was)


def train_code_adapter(model: nn.Module, data: FusionDataset, cfg: SummarizerRecipeConfig, *,
                       eval_data: FusionDataset | None = None, out_dir: str | Path | None = None) -> tuple[list[str], TrainResult]:
    """Inject adapter ``code``, train only its A/B on ``data``, restore the other parameters' flags.

    Returns the wrapped module names and the training result; the adapter is left active.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = inject(model, cfg.adapter_targets, rank=cfg.adapter_rank, alpha=cfg.adapter_alpha,
                   adapter_name=ADAPTER, dropout=cfg.adapter_dropout)
    mark_only_adapter_trainable(model, ADAPTER)
    try:
        with use_adapter(model, ADAPTER):
            result = train_loop(model, fusion_loss, data, cfg.adapter_train, eval_data=eval_data, out_dir=out_dir)
    finally:
        for n, p in model.named_parameters():
            if n in flags and ".lora_" not in n:
                p.requires_grad_(flags[n])
    return names, result


def prompt_heads(pairs: Sequence[FusionPair], fmt: FusionFormat) -> list[list[int]]:
    """``<|bos|><|user|> prompt``: the part of every fusion sequence the intent head reads."""
    return [[fmt.sp["<|bos|>"], fmt.sp["<|user|>"], *p.prompt] for p in pairs]


def fit_intent(model: nn.Module, train_pairs: Sequence[FusionPair], fmt: FusionFormat, pad_id: int, *,
               code_domain: str = "code", C: float = 1.0, eval_pairs: Sequence[FusionPair] = ()) -> tuple[IntentClassifier, float | None]:
    """Fit the intent head (code vs other) on pooled summarizer states; return it and eval accuracy."""
    mapping = {code_domain: "code"}
    with use_adapter(model, None):
        x = pooled_hidden(model, prompt_heads(train_pairs, fmt), pad_id=pad_id)
        clf = IntentClassifier(["code", "other"], x.shape[1], feature="summarizer_hidden", C=C)
        clf.fit(x, domain_intents([p.domain for p in train_pairs], mapping))
        acc = None
        if eval_pairs:
            xe = pooled_hidden(model, prompt_heads(eval_pairs, fmt), pad_id=pad_id)
            acc = clf.accuracy(xe, domain_intents([p.domain for p in eval_pairs], mapping))
    return clf, acc


# ------------------------------------------------------------------ setup / train / cleanup
@dataclass
class FusionData:
    """What :func:`setup` prepares: the fusion pairs, their sequences (with drafts) and the format."""

    fmt: FusionFormat
    pad_id: int
    train_pairs: list[FusionPair]
    val_pairs: list[FusionPair]
    train: FusionDataset
    val: FusionDataset | None


def setup(corpus: Any, tokenizer: Any, drafter: Drafter, out_dir: str | Path, cfg: SummarizerRecipeConfig, *,
          progress: bool = True) -> FusionData:
    """Steps 1-3 of the module docstring: pairs, (cached) drafts, fusion sequences."""
    if drafter.cache is None:
        drafter.cache = DraftCache(Path(out_dir) / "drafts.jsonl")
    fmt = FusionFormat(tokenizer, max_len=cfg.max_len)
    kw = dict(prompt_tokens=cfg.prompt_tokens, target_tokens=cfg.target_tokens, max_replies_per_doc=cfg.max_replies_per_doc)
    train_pairs = fusion_pairs(corpus.train, tokenizer, **kw)
    val_pairs = fusion_pairs(corpus.validation, tokenizer, **kw)
    if not train_pairs:
        raise DataError("summarizer recipe: the corpus's train split gave no fusion pairs")
    pad = tokenizer.pad_id
    train_ds = build_sequences(train_pairs, drafter.draft([p.prompt for p in train_pairs], progress=progress), fmt, pad)
    val_ds = (build_sequences(val_pairs, drafter.draft([p.prompt for p in val_pairs], progress=progress), fmt, pad)
              if val_pairs else None)
    return FusionData(fmt, pad, train_pairs, val_pairs, train_ds, val_ds)


def train(model: nn.Module, data: FusionData, out_dir: str | Path, cfg: SummarizerRecipeConfig) -> dict[str, Any]:
    """Steps 4-6: the summarizer (saved before any adapter exists), the coding adapter, the intent
    head, each saved under ``out_dir/summarizer/``; returns the report so far."""
    from taskmoe.models.checkpoint import save_lm

    out = Path(out_dir)
    result = train_fusion(model, data.train, cfg.train, eval_data=data.val, out_dir=out / "train_summarizer",
                          freeze_embedding=not cfg.fine_tune_embedding)
    save_lm(model, out / "summarizer", kind="summarizer", include_embedding=cfg.fine_tune_embedding,
            meta={"recipe": cfg.to_dict(), "steps": result.steps})
    report: dict[str, Any] = {"fusion_pairs": {"train": len(data.train_pairs), "validation": len(data.val_pairs)},
                              "summarizer_final_loss": result.losses[-1] if result.losses else None}
    if data.val is not None:
        report["val_answer_ppl"] = answer_perplexity(model, data.val)

    code_train = data.train.subset(cfg.code_domain)
    code_val = data.val.subset(cfg.code_domain) if data.val is not None and cfg.code_domain in data.val.domains else None
    if code_val is not None:
        report["code_answer_ppl_base"] = answer_perplexity(model, code_val)
    names, ares = train_code_adapter(model, code_train, cfg, eval_data=code_val, out_dir=out / "train_code_adapter")
    save_adapter(model, out / "summarizer" / "adapters" / ADAPTER, ADAPTER, meta={"steps": ares.steps})
    report["adapter_modules"] = names
    if code_val is not None:
        with use_adapter(model, ADAPTER):
            report["code_answer_ppl_adapter"] = answer_perplexity(model, code_val)

    clf, acc = fit_intent(model, data.train_pairs, data.fmt, data.pad_id, code_domain=cfg.code_domain, C=cfg.intent_C,
                          eval_pairs=data.val_pairs)
    clf.save(out / "summarizer" / "intent")
    report["intent_val_accuracy"] = acc
    return report


def cleanup(report: dict[str, Any], drafter: Drafter, out_dir: str | Path) -> dict[str, Any]:
    """Step 7: add the draft-cache counts and write ``out_dir/summarizer_report.json``."""
    cache = drafter.cache
    report["draft_cache"] = {"entries": len(cache), "hits": cache.hits, "misses": cache.misses} if cache is not None else None
    atomic_write_json(Path(out_dir) / "summarizer_report.json", report)
    return report


def run(
    model: nn.Module,
    corpus: Any,
    tokenizer: Any,
    drafter: Drafter,
    out_dir: str | Path,
    cfg: SummarizerRecipeConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole recipe, :func:`setup` -> :func:`train` -> :func:`cleanup`: writes ``summarizer/``,
    ``summarizer/adapters/code/``, ``summarizer/intent/``, ``drafts.jsonl`` and
    ``summarizer_report.json`` under ``out_dir``."""
    cfg = cfg or SummarizerRecipeConfig()
    data = setup(corpus, tokenizer, drafter, out_dir, cfg, progress=progress)
    return cleanup(train(model, data, out_dir, cfg), drafter, out_dir)
