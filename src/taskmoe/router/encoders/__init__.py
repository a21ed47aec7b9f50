"""Sequence encoders for the router: token ids -> one unit vector per sequence.

Four implementations of the :class:`Encoder` protocol, chosen by ``kind`` (see
:func:`build_encoder`):

- ``learned`` (:class:`LearnedEncoder`, the IMoE seed's default): a token embedding table
  ``nn.Embedding(vocab_size, d_model)`` learned **from scratch** on the corpus, pooled into a
  sequence vector. This table is *the* table every expert and the summarizer share
  (``router.embedding``), stored once in the router folder.
- ``tfidf`` (:class:`TfidfEncoder`): TF-IDF + truncated SVD, the c-BTM router and our baseline.
- ``pretrained`` (:class:`PretrainedEncoder`): any local Hugging Face / sentence-transformers
  checkpoint, mean-pooled; an optional dependency (``transformers``), never downloaded.
- ``backbone`` (:class:`BackboneEncoder`): the pretrained backbone's own hidden states (a chosen
  block, mean over the prompt, centred), reading the backbone's token ids directly.

Every encoder returns float32 rows of unit L2 norm; a sequence the encoder cannot read (no
known token) gives an all-zero row and ``readable(...) == False``, which the router turns into
its documented fallback.

One file per encoder (``learned.py``, ``tfidf.py``, ``pretrained.py``, ``backbone.py``) over the protocol in
``base.py``; this module is the registry (:data:`ENCODERS`, :data:`CONFIGS`, :func:`build_encoder`,
:func:`load_encoder`) and re-exports every public name, so ``taskmoe.router.encoders.X`` is
unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from taskmoe.config import Config
from taskmoe.errors import ConfigError
from taskmoe.router.encoders.backbone import BackboneEncoder, BackboneEncoderConfig, attach_backbone
from taskmoe.router.encoders.base import Encoder, LossFn, NotFittedError, Seqs, Trainer
from taskmoe.router.encoders.learned import LearnedEncoder, LearnedEncoderConfig, SpanPairs, bag_of_words_nll, info_nce
from taskmoe.router.encoders.pretrained import PretrainedEncoder, PretrainedEncoderConfig
from taskmoe.router.encoders.tfidf import TfidfEncoder, TfidfEncoderConfig

__all__ = [
    "Encoder", "LossFn", "NotFittedError", "Seqs", "Trainer", "LearnedEncoder", "LearnedEncoderConfig", "SpanPairs",
    "bag_of_words_nll", "info_nce", "PretrainedEncoder", "PretrainedEncoderConfig", "TfidfEncoder", "TfidfEncoderConfig",
    "BackboneEncoder", "BackboneEncoderConfig", "attach_backbone", "ENCODERS", "CONFIGS", "build_encoder", "load_encoder",
]

ENCODERS: dict[str, Any] = {c.kind: c for c in (LearnedEncoder, TfidfEncoder, PretrainedEncoder, BackboneEncoder)}
CONFIGS: dict[str, type[Config]] = {"learned": LearnedEncoderConfig, "tfidf": TfidfEncoderConfig, "pretrained": PretrainedEncoderConfig,
                                    "backbone": BackboneEncoderConfig}


def build_encoder(kind: str, cfg: Config, *, decode: Callable[[Sequence[int]], str] | None = None) -> Encoder:
    """An unfitted encoder of ``kind`` ('learned' | 'tfidf' | 'pretrained' | 'backbone') from its config."""
    if kind not in ENCODERS:
        raise ConfigError(f"encoder kind must be one of {sorted(ENCODERS)}, got {kind!r}")
    if not isinstance(cfg, CONFIGS[kind]):
        raise ConfigError(f"encoder kind {kind!r} needs a {CONFIGS[kind].__name__}, got {type(cfg).__name__}")
    if kind == "pretrained":
        return PretrainedEncoder(cfg, decode=decode)  # type: ignore[arg-type]
    return ENCODERS[kind](cfg)


def load_encoder(kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], *, decode: Callable[[Sequence[int]], str] | None = None) -> Encoder:
    if kind not in ENCODERS:
        raise ConfigError(f"encoder kind must be one of {sorted(ENCODERS)}, got {kind!r}")
    return ENCODERS[kind].from_saved(config, tensors, decode=decode)
