"""Recipe: fit a router on a corpus (``taskmoe route fit``).

Thin by design (setup / train / cleanup): everything the router *is* lives in
:mod:`taskmoe.router`; this file only

- **setup** (:func:`setup`): loads the corpus (the embedded default or ``--source``), loads or trains the
  tokenizer, tokenises the train and validation splits, and builds a :class:`RouterConfig`;
- **train** (:func:`train` = :func:`train_router`): calls :func:`taskmoe.router.fit.fit_router` with a trainer built on the shared loop
  (:func:`loop_trainer`, used by the learned encoder's contrastive objective);
- **cleanup** (:func:`cleanup`): saves the router folder (with the tokenizer) and returns a short report.

The domain labels of the corpus are never passed to the router.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from taskmoe.config import load_config
from taskmoe.data.commands import DEFAULT_VOCAB_SIZE, corpus_tokenizer, get_corpus
from taskmoe.data.corpus import Corpus
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.errors import ConfigError
from taskmoe.router.encoders import Trainer
from taskmoe.router.fit import RouterConfig, fit_router
from taskmoe.router.router import Router
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import train as train_loop

DEFAULT_OUT = Path("runs/default/router")


def loop_trainer(lr: float, *, seed: int = 0, out_dir: Path | None = None, progress: bool = True, warmup_frac: float = 0.05) -> Trainer:
    """A :data:`~taskmoe.router.encoders.Trainer` running the shared loop for ``dataset.steps`` steps.

    Warmup is ``warmup_frac`` of the steps, then cosine decay; no evaluation; with ``out_dir``,
    metrics and a checkpoint every quarter of the run go there, so an interrupted fit resumes.
    """

    def run(model: Any, loss_fn: Any, dataset: Any) -> Any:
        cfg = TrainConfig(
            max_steps=dataset.steps, batch_size=dataset.batch_size, lr=lr, warmup_steps=int(warmup_frac * dataset.steps),
            seed=seed, progress=progress, save_every=max(1, dataset.steps // 4) if out_dir is not None else 0,
            eval_every=0, log_every=10,
        )  # fmt: skip
        return train_loop(model, loss_fn, dataset, cfg, out_dir=out_dir, resume=True)

    return run


def tokenize(tokenizer: Tokenizer, docs: Sequence[Any]) -> list[list[int]]:
    return tokenizer.encode_batch([d.text for d in docs], allow_special=False)


def setup(
    source: Optional[str], tokenizer: Optional[Path], vocab_size: int, max_docs_per_domain: Optional[int], progress: bool,
    backbone: Optional[Path] = None,
) -> tuple[Corpus, Tokenizer]:
    """The corpus and the tokenizer: the backbone's own with ``backbone``, else ``tokenizer`` or a BPE trained here."""
    corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress)
    if backbone is not None:
        from taskmoe.data.backbone_tokenizer import BackboneTokenizer

        if tokenizer is not None:
            raise ConfigError("--tokenizer and --backbone exclude each other: a backbone router uses the backbone's tokenizer")
        return corpus, BackboneTokenizer.load(backbone)
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else corpus_tokenizer(corpus, vocab_size, progress=progress)
    return corpus, tok


def build_config(
    encoder: str, n_categories: str, d_model: int, steps: int, pretrained_path: str, seed: int, config: Optional[Path],
    overrides: Sequence[str] = (),
    backbone: Optional[Path] = None, layer: Optional[int] = None,
) -> RouterConfig:
    """The RouterConfig from a JSON file (``--config``) or the defaults, with the CLI's flags applied,
    then the ``--set PATH=VALUE`` overrides (:func:`taskmoe.config.apply_overrides`)."""
    n_cat: int | str
    if n_categories == "auto":
        n_cat = "auto"
    else:
        try:
            n_cat = int(n_categories)
        except ValueError:
            raise ConfigError(f"n_categories must be an integer or 'auto', got {n_categories!r}") from None
    flags = {"encoder": encoder, "learned.d_model": d_model, "learned.steps": steps, "learned.seed": seed,
             "pretrained.path": pretrained_path or None, "clustering.n_categories": n_cat, "clustering.seed": seed,
             "backbone.path": None if backbone is None else str(backbone), "backbone.layer": layer}
    return load_config(RouterConfig, config, flags=flags, overrides=overrides)


def train_router(
    corpus: Corpus, tok: Tokenizer, cfg: RouterConfig, *, train_dir: Path | None = None, progress: bool = True,
    log: Any = print, backbone: Any = None,
) -> Router:
    """Fit a router on ``corpus`` (train split; validation split for calibration); ``backbone`` is
    an already loaded backbone model for the backbone encoder."""
    train_ids = tokenize(tok, corpus.train)
    val_ids = tokenize(tok, corpus.validation)
    trainer = loop_trainer(cfg.learned.lr, seed=cfg.learned.seed, out_dir=train_dir, progress=progress)
    return fit_router(train_ids, val_ids, cfg, trainer=trainer, tokenizer=tok, log=log, backbone=backbone)


def route_fit(
    out: Path = DEFAULT_OUT,
    source: Optional[str] = None,
    tokenizer: Optional[Path] = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    n_categories: str = "4",
    encoder: str = "learned",
    d_model: int = 256,
    steps: int = 800,
    max_docs_per_domain: Optional[int] = None,
    pretrained_path: str = "",
    backbone: Optional[Path] = None,
    layer: Optional[int] = None,
    config: Optional[Path] = None,
    set: Optional[list[str]] = None,
    train_dir: Optional[Path] = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit a router (encoder, categories, calibrated classifier, complexity scorer) and save it.

    Uses the embedded default corpus unless --source is given; --tokenizer loads a tokenizer.json,
    else a BPE of --vocab-size is trained on the train split (cached). --n-categories is an
    integer or 'auto' (chosen by silhouette). --encoder: learned (default; its embedding table is
    the one experts share), tfidf (c-BTM baseline), pretrained (--pretrained-path, local only) or
    backbone (--backbone DIR: mean-pooled hidden states of block --layer of the backbone, with the
    backbone's tokenizer; any encoder given --backbone uses the backbone's tokenizer).
    --config reads a RouterConfig JSON; the flags above override it, and --set PATH=VALUE
    (repeatable, e.g. --set classifier.epochs=50 --set policy.k=2) overrides any field last.
    The folder OUT holds the router and its tokenizer.json.
    """
    if encoder == "backbone" and backbone is None:
        raise ConfigError("--encoder backbone needs --backbone DIR (a folder made by `taskmoe backbone import`)")
    cfg = build_config(encoder, n_categories, d_model, steps, pretrained_path, seed, config, set or (),
                       backbone=backbone, layer=layer)
    corpus, tok = setup(source, tokenizer, vocab_size, max_docs_per_domain, progress, backbone)
    router = train_router(corpus, tok, cfg, train_dir=train_dir, progress=progress, log=print if progress else (lambda s: None))
    return cleanup(router, out, cfg)


train = train_router
"""The recipe's train step (setup / train / cleanup)."""


def cleanup(router: Router, out: Path, cfg: RouterConfig) -> dict[str, Any]:
    """Save the router folder (with its tokenizer) and return the summary row."""
    path = router.save(out)
    rep = router.report
    row: dict[str, Any] = {
        "router": str(path),
        "encoder": cfg.encoder,
        "n_categories": router.n_categories,
        "cluster_sizes": rep.get("cluster_sizes"),
        "val_ece": rep.get("classifier", {}).get("val_ece"),
        "temperature": rep.get("classifier", {}).get("temperature"),
        "complexity_train_acc": rep.get("complexity", {}).get("train_acc"),
        "seconds": rep.get("t_total_s"),
    }
    if "silhouette" in rep:
        row["silhouette"] = json.dumps({r["n_categories"]: r["silhouette"] for r in rep["silhouette"]})
    for name, desc in zip(router.categories, router.descriptions):
        row[f"category {name}"] = desc
    return row
