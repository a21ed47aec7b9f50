"""A :class:`~taskmoe.router.router.Router` on disk: :func:`save_router`, :func:`load_router`,
and :func:`load_shared_embedding` (the shared token table read alone, for experts and the
summarizer).

Kept apart from the routing code so the ``Router`` class holds only routing and class addition;
``Router.save`` / ``Router.load`` call these. The folder layout (all through :mod:`taskmoe.io`,
so writes are atomic and loading validates the component kind)::

    router/config.json              kind "router": encoder kind + config, policy, classifier
                                    config, category names and descriptions; meta: fit report
    router/model.safetensors        encoder.* (the shared embedding table for 'learned'), head.*
    router/centroids.safetensors    centroids (K, D), replay.x (R, D), replay.labels (R,)
    router/complexity.json          feature names, mean, scale, coef, intercept (readable)
    router/complexity.safetensors   the scorer's per-token tables (vocabulary statistics)
    router/tokenizer.json           the tokenizer the ids come from (when known)
    router/tokenizer_config.json    a backbone tokenizer's config and chat template (when it has one)

A mismatch between the files (weights vs config, tokenizer vs embedding vocabulary, head outputs
vs categories, the complexity feature list) raises :class:`~taskmoe.errors.CheckpointError`
naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskmoe.errors import CheckpointError
from taskmoe.io import atomic_write_json, load_component, load_tensors, read_json, save_component, save_tensors
from taskmoe.router.classifier import ClassifierConfig, head_from_tensors
from taskmoe.router.complexity import FEATURES, ComplexityScorer
from taskmoe.router.encoders import LearnedEncoder, load_encoder
from taskmoe.router.policy import PolicyConfig
from taskmoe.router.router import KIND, TOKENIZER_FILE, Replay, Router

__all__ = ["save_router", "load_router", "load_shared_embedding"]

_CONFIG_KEYS = ("encoder_kind", "encoder", "policy", "classifier", "categories")


def save_router(router: Router, folder: str | Path) -> Path:
    """Write ``router`` to ``folder`` (layout in the module docstring); returns the folder."""
    router._check_fitted()
    sc = router.complexity
    tensors = {f"encoder.{k}": v for k, v in router.encoder.tensors().items()}
    tensors.update({f"head.{k}": v for k, v in router.head.tensors().items()})
    side = {"centroids": torch.from_numpy(router.centroids)}
    if router.replay is not None:
        side["replay.x"] = torch.from_numpy(router.replay.x)
        side["replay.labels"] = torch.from_numpy(router.replay.labels)
    extra = {
        "centroids.safetensors": lambda p: save_tensors(p, side),
        "complexity.safetensors": lambda p: save_tensors(p, {k: v for k, v in sc.tensors().items() if k.startswith(("complexity.vocab.", "complexity.table"))}),
        "complexity.json": lambda p: atomic_write_json(p, {
            "features": list(FEATURES), "mean": sc.mean.tolist(), "scale": sc.scale.tolist(),
            "coef": sc.coef.tolist(), "intercept": sc.intercept,
        }),
    }  # fmt: skip
    if router.tokenizer is not None:
        extra[TOKENIZER_FILE] = lambda p: p.write_text(router.tokenizer.to_str(), encoding="utf-8")
        if hasattr(router.tokenizer, "chat_template"):  # a backbone's tokenizer: its config travels with it
            extra["tokenizer_config.json"] = lambda p: atomic_write_json(
                p, {**router.tokenizer.config, "chat_template": router.tokenizer.chat_template})
    config = {
        "encoder_kind": router.encoder.kind,
        "encoder": router.encoder.config_dict(),
        "policy": router.policy.to_dict(),
        "classifier": router.classifier_cfg.to_dict(),
        "categories": router.categories,
        "descriptions": router.descriptions,
        "dim": int(router.centroids.shape[1]),
    }
    return save_component(folder, KIND, config, tensors, meta={"report": router.report}, extra_files=extra)


def _load_complexity(folder: Path) -> ComplexityScorer:
    """The scorer from ``complexity.safetensors`` (tables) + ``complexity.json`` (the readable fit)."""
    cx = load_tensors(folder / "complexity.safetensors")
    cj = read_json(folder / "complexity.json")
    if cj.get("features") != list(FEATURES):
        raise CheckpointError(f"{folder / 'complexity.json'}: feature list {cj.get('features')} differs from this taskmoe's {list(FEATURES)}")
    cx.update({
        "complexity.mean": torch.tensor(cj["mean"], dtype=torch.float64),
        "complexity.scale": torch.tensor(cj["scale"], dtype=torch.float64),
        "complexity.coef": torch.tensor(cj["coef"], dtype=torch.float64),
        "complexity.intercept": torch.tensor([cj["intercept"]], dtype=torch.float64),
    })  # fmt: skip
    return ComplexityScorer.from_tensors(cx)


def load_router(folder: str | Path, *, tokenizer: Any = None) -> Router:
    """Load a router folder; ``tokenizer`` overrides the folder's ``tokenizer.json``."""
    comp = load_component(folder, KIND)
    cfg = comp.config
    for key in _CONFIG_KEYS:
        if key not in cfg:
            raise CheckpointError(f"{comp.folder / 'config.json'}: router config lacks {key!r}")
    if tokenizer is None and (comp.folder / TOKENIZER_FILE).is_file():
        from taskmoe.data.backbone_tokenizer import BackboneTokenizer, is_backbone_tokenizer_dir
        from taskmoe.data.tokenizer import Tokenizer

        tokenizer = (BackboneTokenizer.load(comp.folder) if is_backbone_tokenizer_dir(comp.folder)
                     else Tokenizer.load(comp.folder / TOKENIZER_FILE))
    weights = comp.tensors()
    enc_t = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    head_t = {k[len("head."):]: v for k, v in weights.items() if k.startswith("head.")}
    try:
        encoder = load_encoder(cfg["encoder_kind"], cfg["encoder"], enc_t, decode=tokenizer.decode if tokenizer is not None else None)
        head = head_from_tensors(head_t)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{comp.weights}: router weights do not match config.json ({e})") from e
    if isinstance(encoder, LearnedEncoder) and tokenizer is not None and tokenizer.vocab_size != encoder.cfg.vocab_size:
        raise CheckpointError(
            f"{comp.folder}: vocabulary size mismatch: tokenizer has {tokenizer.vocab_size}, "
            f"embedding table has {encoder.cfg.vocab_size}"
        )
    side = load_tensors(comp.folder / "centroids.safetensors")
    complexity = _load_complexity(comp.folder)
    replay = Replay(side["replay.x"].numpy(), side["replay.labels"].numpy()) if "replay.x" in side else None
    cats = list(cfg["categories"])
    if head.out.out_features != len(cats):
        raise CheckpointError(f"{comp.weights}: head has {head.out.out_features} outputs for {len(cats)} categories")
    return Router(
        encoder, head, side["centroids"].numpy(), complexity,
        PolicyConfig.from_dict(cfg["policy"], source=f"{comp.folder}/config.json:policy"), cats,
        classifier_cfg=ClassifierConfig.from_dict(cfg["classifier"], source=f"{comp.folder}/config.json:classifier"),
        replay=replay, descriptions=cfg.get("descriptions"), tokenizer=tokenizer, report=comp.meta.get("report", {}),
    )


def load_shared_embedding(folder: str | Path) -> nn.Embedding:
    """The router's shared token embedding table, read alone from ``folder/model.safetensors``.

    For experts and the summarizer, which share this table (pass it as ``embedding=`` to the
    ``taskmoe.models`` builders). Raises CheckpointError when the router has no learned table.
    """
    comp = load_component(folder, KIND)
    if comp.config.get("encoder_kind") != "learned":
        raise CheckpointError(
            f"{comp.folder}: router uses the {comp.config.get('encoder_kind')!r} encoder, which has no shared "
            "embedding table (fit the router with encoder='learned')"
        )
    w = comp.tensors()["encoder.embedding.weight"]  # (V, D)
    emb = nn.Embedding(w.shape[0], w.shape[1])
    with torch.no_grad():
        emb.weight.copy_(w)
    return emb
