"""Recipe: train a DOE model (``taskmoe train doe``), add an expert to it (``taskmoe doe add-expert``),
and report which expert takes which domain (``taskmoe doe report``).

Thin by design (setup / train / cleanup) over the shared loop (:func:`taskmoe.training.loop.train`)
and the model in :mod:`taskmoe.doe`:

- **setup**: corpus (the embedded default, or ``--source``), tokenizer (given, or trained on the
  corpus and cached), and one window set per split. Windows never cross a document boundary
  (a sequence is routed as a whole, so it must be one document): each document is cut into
  windows of ``seq_len + 1`` tokens (``<|bos|>`` first, the last one padded). The first
  ``prompt_len`` positions are the *prompt*: routing pools over them only, and the loss skips
  the targets that routing has already seen (``t < prompt_len - 1``), so training measures
  exactly what generation does: continue a sequence routed from its prompt.
- **train**: LM cross-entropy + ``gate_loss_weight`` x the gate BCE (targets: the capacity
  assignment, or the IMoE router's categories with ``--gate-supervision router``). With
  ``--compare-dense`` a dense transformer with the same active parameters is trained on the same
  windows for the same steps.
- **cleanup**: the model folder (``kind = "doe"``, with ``tokenizer.json``), and a report:
  held-out perplexity of both models, the expert x domain table, NMI / purity of the chosen expert
  vs domain (domains are never given to the model), and a heatmap PNG.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from taskmoe.config import Config, FlagPaths, check, config_from_flags, doc
from taskmoe.data.commands import DEFAULT_VOCAB_SIZE, corpus_command, corpus_tokenizer, get_corpus
from taskmoe.data.corpus import Corpus
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.doe.model import DOEConfig, DOETransformer, build_doe, load_doe, save_doe
from taskmoe.doe.routing import gate_loss
from taskmoe.errors import ConfigError, DataError
from taskmoe.eval.nll import batched, corpus_nll
from taskmoe.eval.doe import expert_choices, plot_heatmap, routing_report
from taskmoe.io import atomic_write_json
from taskmoe.models import TransformerLMConfig, transformer_lm
from taskmoe.training.config import TrainConfig
from taskmoe.training.losses import IGNORE_INDEX, lm_cross_entropy
from taskmoe.training.loop import train as train_loop
from taskmoe.training.recipes.command import recipe_command

__all__ = ["DOERecipeConfig", "recipe_config", "DocumentWindows", "windows_for", "doe_loss_fn", "dense_loss_fn",
           "perplexity", "expert_choices", "routing_report", "plot_heatmap", "Setup", "setup", "train", "cleanup",
           "train_doe", "load_with_tokenizer", "doe_report"]

DEFAULT_OUT = Path("runs/default/doe")
TOKENIZER_FILE = "tokenizer.json"


# ------------------------------------------------------------------------------------ data
class DocumentWindows(Dataset):
    """Per-document windows for sequence routing (see module docstring).

    Item: ``input_ids`` (T,), ``targets`` (T,) (``-100`` on padding and inside the prompt),
    ``prompt_mask`` (T,) bool, ``domain`` () index into ``domains`` (-1 unknown), ``label`` ()
    gate label (-1 none), with ``T = seq_len``.
    """

    def __init__(self, docs_ids: Sequence[Sequence[int]], domains: Sequence[int], labels: Sequence[int] | None,
                 *, seq_len: int, prompt_len: int, bos_id: int, pad_id: int, min_targets: int = 8) -> None:
        if not 1 <= prompt_len < seq_len:
            raise ConfigError(f"DocumentWindows: need 1 <= prompt_len ({prompt_len}) < seq_len ({seq_len})")
        labels = list(labels) if labels is not None else [-1] * len(docs_ids)
        rows, meta = [], []
        for ids, dom, lab in zip(docs_ids, domains, labels):
            seq = [bos_id, *ids]
            for start in range(0, max(1, len(seq) - 1), seq_len):
                w = seq[start : start + seq_len + 1]
                if len(w) - 1 < prompt_len - 1 + min_targets:
                    continue
                rows.append(w + [pad_id] * (seq_len + 1 - len(w)))
                meta.append((len(w), dom, lab))
        if not rows:
            raise DataError(f"DocumentWindows: no document has prompt_len + {min_targets} = "
                            f"{prompt_len + min_targets} tokens; lower prompt_len or add data")
        self.tokens = torch.tensor(rows, dtype=torch.long)  # (N, T + 1)
        self.lengths = torch.tensor([m[0] for m in meta])
        self.domains = torch.tensor([m[1] for m in meta])
        self.labels = torch.tensor([m[2] for m in meta])
        self.seq_len, self.prompt_len = seq_len, prompt_len

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.tokens[i]
        T, P = self.seq_len, self.prompt_len
        targets = w[1:].clone()
        pos = torch.arange(T)
        targets[(pos >= self.lengths[i] - 1) | (pos < P - 1)] = IGNORE_INDEX
        return {"input_ids": w[:-1], "targets": targets, "prompt_mask": pos < P, "domain": self.domains[i],
                "label": self.labels[i]}


def windows_for(docs: Sequence[Any], tok: Tokenizer, domains: Sequence[str], seq_len: int, prompt_len: int,
                labels: Sequence[int] | None = None) -> DocumentWindows:
    ids = tok.encode_batch([d.text for d in docs], allow_special=False)
    dom = [domains.index(d.domain) if d.domain in domains else -1 for d in docs]
    return DocumentWindows(ids, dom, labels, seq_len=seq_len, prompt_len=prompt_len, bos_id=tok.bos_id,
                           pad_id=tok.pad_id)


# ---------------------------------------------------------------------------------- losses
def doe_loss_fn(gate_weight: float, supervised: bool) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]:
    """``loss = CE(logits, targets) + gate_weight * BCE(gates)``; works on a DDP-wrapped model."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["input_ids"], prompt_mask=batch["prompt_mask"])
        lm = lm_cross_entropy(out.logits, batch["targets"])
        g = gate_loss(out.routing, batch["label"] if supervised else None)
        n_experts = out.routing.scores.shape[1]
        share = torch.bincount(out.routing.top1(), minlength=n_experts).float() / out.routing.batch_size
        return lm + gate_weight * g, {"lm": lm.detach(), "gate": g.detach(), "max_share": share.max(),
                                      "tokens": int((batch["targets"] != IGNORE_INDEX).sum())}

    return loss_fn


def dense_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    out = model(batch["input_ids"])
    lm = lm_cross_entropy(out.logits, batch["targets"])
    return lm, {"lm": lm.detach(), "tokens": int((batch["targets"] != IGNORE_INDEX).sum())}


def perplexity(model: nn.Module, data: DocumentWindows, batch_size: int = 16) -> float:
    """``exp(sum NLL / #targets)`` over every window (eval mode: DOE routes by threshold)."""
    doe = isinstance(model, DOETransformer)

    def forward(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"prompt_mask": b["prompt_mask"]} if doe else {}
        return model(b["input_ids"], **kw).logits, b["targets"]

    return corpus_nll(forward, batched(data, batch_size, default_collate), model=model).ppl


# ---------------------------------------------------------------------------------- config
@dataclass
class DOEWindowsConfig(Config):
    """The windows a DOE model reads (``train doe`` and ``doe add-expert``)."""

    seq_len: int = doc(256, "tokens per window (windows never cross a document boundary)")
    prompt_len: int = doc(32, "leading tokens of a window that routing reads; the loss skips what routing saw")

    def validate(self) -> None:
        check(1 <= self.prompt_len < self.seq_len,
              f"{type(self).__name__}: need 1 <= prompt_len ({self.prompt_len}) < seq_len ({self.seq_len})")


@dataclass
class DOERecipeConfig(DOEWindowsConfig):
    """The windows, the DOE model and its training run (``taskmoe train doe``)."""

    vocab_size: int = doc(DEFAULT_VOCAB_SIZE, "BPE vocabulary size when the tokenizer is trained on the corpus")
    model: DOEConfig = doc(DOEConfig(lm=TransformerLMConfig(d_model=128, n_layers=4, n_heads=4)),
                           "the DOE transformer (lm.vocab_size is set from the tokenizer; experts are renamed after "
                           "the router's categories with gate_supervision='router')")
    compare_dense: bool = doc(True, "also train a dense transformer with the same active parameters on the same windows")
    train: TrainConfig = doc(TrainConfig(max_steps=500, batch_size=16, lr=2e-3, warmup_steps=25, eval_every=0,
                                         save_every=0, log_every=10, weight_decay=0.1),
                             "the training run (the dense baseline uses the same one)")

    def validate(self) -> None:
        super().validate()
        check(self.vocab_size >= 1, f"DOERecipeConfig.vocab_size must be >= 1, got {self.vocab_size}")


FLAGS: dict[str, FlagPaths] = {
    "vocab_size": "vocab_size", "seq_len": "seq_len", "prompt_len": "prompt_len", "compare_dense": "compare_dense",
    "d_model": "model.lm.d_model", "n_layers": "model.lm.n_layers", "n_heads": "model.lm.n_heads",
    "moe_every": "model.moe_every", "max_experts": "model.max_experts", "tau": "model.tau",
    "capacity_factor": "model.capacity_factor", "gate_supervision": "model.gate_supervision",
    "gate_loss_weight": "model.gate_loss_weight", "steps": "train.max_steps", "batch_size": "train.batch_size",
    "lr": "train.lr", "seed": "train.seed", "progress": "train.progress",
}
"""``train doe`` / ``doe add-expert`` flag -> the config path it sets."""


def steps_warmup(flags: dict[str, Any]) -> dict[str, Any]:
    """``steps`` also sets the warm-up to steps // 20 (``train doe``, ``doe add-expert``)."""
    return {} if flags.get("steps") is None else {"train.warmup_steps": max(1, int(flags["steps"]) // 20)}


def _derive(flags: dict[str, Any]) -> dict[str, Any]:
    """``experts=N`` names the experts e0..e{N-1}; see :func:`steps_warmup`."""
    extra = steps_warmup(flags)
    if flags.get("experts") is not None:
        extra["model.experts"] = [f"e{i}" for i in range(int(flags["experts"]))]
    return extra


def recipe_config(config: Optional[Path] = None, overrides: Sequence[str] = (), **flags: Any) -> DOERecipeConfig:
    """JSON file (or defaults) -> flags (None = unset; see :func:`_derive`) -> ``--set`` overrides."""
    extra = _derive(flags)
    flags.pop("experts", None)
    return config_from_flags(DOERecipeConfig, config, FLAGS, flags, overrides, recipe="doe", extra=extra)


# ----------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    corpus: Corpus
    tok: Tokenizer
    domains: list[str]
    train: DocumentWindows
    val: DocumentWindows
    cfg: DOERecipeConfig | None = None


def router_labels(router_dir: Path, docs: Sequence[Any]) -> tuple[list[int], list[str]]:
    """The IMoE router's top category per document (its own tokenizer), and its category names."""
    from taskmoe.router.router import Router

    router = Router.load(router_dir)
    if router.tokenizer is None:
        raise ConfigError(f"{router_dir}: the router folder has no tokenizer.json; it cannot label text")
    conf = router.confidences(router.tokenizer.encode_batch([d.text for d in docs]))
    return [int(i) for i in conf.argmax(axis=1)], list(router.categories)


def setup(source: Optional[str], tokenizer: Optional[Path], vocab_size: int, max_docs_per_domain: Optional[int],
          seq_len: int, prompt_len: int, progress: bool, labels_from: Optional[Path] = None) -> tuple[Setup, list[str] | None]:
    """Corpus, tokenizer and the train/validation windows (with router labels when ``labels_from``)."""
    corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress)
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else corpus_tokenizer(corpus, vocab_size, progress=progress)
    domains = list(corpus.domains)
    cats = None
    tr_labels = va_labels = None
    if labels_from is not None:
        tr_labels, cats = router_labels(labels_from, corpus.train)
        va_labels, _ = router_labels(labels_from, corpus.validation)
    train = windows_for(corpus.train, tok, domains, seq_len, prompt_len, tr_labels)
    val = windows_for(corpus.validation or corpus.test, tok, domains, seq_len, prompt_len, va_labels)
    return Setup(corpus, tok, domains, train, val), cats


def train(s: Setup, cfg: DOERecipeConfig, out: Path) -> tuple[DOETransformer, dict[str, Any]]:
    """Train the DOE model (and, with ``compare_dense``, the dense baseline) on ``s``; resumes from ``out``."""
    m = cfg.model
    model = build_doe(m)
    res = train_loop(model, doe_loss_fn(m.gate_loss_weight, m.gate_supervision == "router"), s.train, cfg.train,
                     out_dir=out / "train", resume=True)
    summary: dict[str, Any] = {"steps": res.steps, "train_windows": len(s.train), "val_windows": len(s.val),
                               **{f"params_{k}": v for k, v in model.count_params().items()},
                               "doe_val_ppl": perplexity(model, s.val)}
    if cfg.compare_dense:
        torch.manual_seed(cfg.train.seed)
        dense = transformer_lm(m.lm)
        train_loop(dense, dense_loss_fn, s.train, cfg.train, out_dir=out / "train_dense", resume=True)
        summary["dense_params"] = dense.num_params()
        summary["dense_val_ppl"] = perplexity(dense, s.val)
    return model, summary


def cleanup(model: DOETransformer, s: Setup, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Save the model folder (with its tokenizer), the routing report and ``reports/metrics.json``."""
    folder = save_doe(model, out / "model", meta={"steps": summary["steps"], "domains": s.domains},
                      extra_files={TOKENIZER_FILE: lambda p: p.write_text(s.tok.to_str(), encoding="utf-8")})
    rep = routing_report(model, s.val, s.domains, out / "reports")
    summary = {"model": str(folder), **summary, "nmi_expert_vs_domain": rep["nmi"], "purity": rep["purity"],
               "fallback_rate": rep["fallback_rate"], "plot": rep["plot"]}
    atomic_write_json(out / "reports" / "metrics.json", summary)
    return summary


# ------------------------------------------------------------------------------------ CLI
@recipe_command(DOERecipeConfig, FLAGS, recipe="doe", derive=_derive,
                derived={"experts": (int, "number of experts, named e0..e{N-1} (default: the model config's)")})
def train_doe(out: Path = DEFAULT_OUT, source: Optional[str] = None, tokenizer: Optional[Path] = None,
              max_docs_per_domain: Optional[int] = None, router: Optional[Path] = None, *,
              cfg: DOERecipeConfig) -> dict[str, Any]:
    """Train a DOE transformer (sequence-routed experts) on the embedded corpus, or --source.

    Reports held-out perplexity (and a dense transformer's with the same active parameters when
    --compare-dense), and which expert takes which domain (NMI, table, heatmap). With
    --gate-supervision router, --router names a fitted IMoE router folder whose categories
    supervise the gates (one expert per category). --config reads a DOERecipeConfig JSON (the
    flags above then apply on top of it), and --set PATH=VALUE (repeatable, e.g.
    --set model.expert_hidden=256 --set train.warmup_steps=10) overrides any field last.
    """
    if cfg.model.gate_supervision == "router" and router is None:
        raise ConfigError("train doe: --gate-supervision router needs --router PATH (a fitted router folder)")
    torch.manual_seed(cfg.train.seed)
    t0 = time.time()
    s, cats = setup(source, tokenizer, cfg.vocab_size, max_docs_per_domain, cfg.seq_len, cfg.prompt_len,
                    cfg.train.progress, labels_from=router if cfg.model.gate_supervision == "router" else None)
    model_cfg = cfg.model.replace(lm=cfg.model.lm.replace(vocab_size=s.tok.vocab_size),
                                  **({"experts": [c.replace(" ", "_") for c in cats]} if cats else {}))
    cfg = cfg.replace(model=model_cfg)
    s.cfg = cfg
    model, summary = train(s, cfg, Path(out))
    return {**cleanup(model, s, summary, Path(out)), "seconds": time.time() - t0}


def load_with_tokenizer(model: Path) -> tuple[DOETransformer, Tokenizer]:
    m = load_doe(model)
    tok_path = Path(model) / TOKENIZER_FILE
    if not tok_path.is_file():
        raise ConfigError(f"{tok_path}: missing; a DOE model folder written by `train doe` holds its tokenizer")
    return m, Tokenizer.load(tok_path)


@corpus_command
def doe_report(model: Path = DEFAULT_OUT / "model", split: str = "validation", out: Optional[Path] = None,
               seq_len: int = 256, prompt_len: int = 32, *, corpus: Corpus) -> list[dict[str, Any]]:
    """Which expert takes which domain: table, NMI of the chosen expert vs domain, heatmap PNG."""
    m, tok = load_with_tokenizer(model)
    if split not in corpus.splits:
        raise ConfigError(f"doe report: split must be one of {sorted(corpus.splits)}, got {split!r}")
    domains = list(corpus.domains)
    data = windows_for(corpus.splits[split], tok, domains, seq_len, prompt_len)
    rep = routing_report(m, data, domains, Path(out) if out is not None else Path(model).parent / "reports")
    print(f"NMI(expert, domain) = {rep['nmi']:.3f}, purity = {rep['purity']:.3f}, "
          f"fallback = {rep['fallback_rate']:.1%} over {rep['windows']} windows; plot: {rep['plot']}")
    return rep["table"]


def __getattr__(name: str) -> Any:
    """``add_expert`` (``taskmoe doe add-expert``) lives in :mod:`taskmoe.training.recipes.doe_add`, which imports
    this module; it stays importable from here."""
    if name == "add_expert":
        from taskmoe.training.recipes.doe_add import add_expert

        return add_expert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
