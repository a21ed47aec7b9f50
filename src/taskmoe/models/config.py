"""One config per architecture: a small shared base and the blocks' own configs.

- :class:`LMConfig` — what every causal LM has: vocabulary, width, depth, heads, MLP width,
  norm epsilon, dropout, init std. It is also the base class of the three below, and a builder
  given a plain ``LMConfig`` upgrades it with its own defaults (:meth:`LMConfig.coerce`).
- :class:`ExpertLMConfig` (``expert_lm``: TCN + linear attention) = base + :class:`ConvConfig` +
  :class:`LinearAttentionConfig`.
- :class:`SummarizerLMConfig` (``summarizer_lm``: selective SSM) = base + :class:`SSMConfig`.
- :class:`TransformerLMConfig` (``transformer_lm``: attention + MLP) = base + ``rope_base``.

Old checkpoints: until this split, ``config.json``'s ``"lm"`` held the flat union of all three
architectures (``conv_kernel``, ``la_decay``, ``ssm_state``, ``rope_base``, ...). ``from_dict``
still reads that form: each class maps its own flat fields (:data:`LEGACY_FIELDS`) onto its
sub-configs and drops the other architectures' fields. The builder name stored next to
``"lm"`` picks the class (:data:`taskmoe.models.builders.CONFIGS`). Any other unknown key is
still an error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from taskmoe.config import Config, check, check_choice, check_ints, check_range, doc

__all__ = ["LMConfig", "ConvConfig", "LinearAttentionConfig", "SSMConfig", "ExpertLMConfig", "SummarizerLMConfig",
           "TransformerLMConfig", "FEATURE_MAPS", "DECAYS", "LEGACY_FIELDS"]

FEATURE_MAPS = ("identity", "elu1")
DECAYS = ("data", "fixed", "none")

LEGACY_FIELDS = ("conv_kernel", "conv_levels", "la_feature_map", "la_decay", "la_normalize", "chunk_size",
                 "ssm_state", "ssm_expand", "ssm_conv", "ssm_dt_rank", "ssm_chunk", "rope_base")
"""The architecture fields of the old flat ``LMConfig`` (read from old checkpoints, never written)."""

L = TypeVar("L", bound="LMConfig")


# ------------------------------------------------------------------------ block configs
@dataclass
class ConvConfig(Config):
    """The expert's TemporalConv block (dilated depthwise convolutions)."""

    kernel: int = doc(3, "taps of each dilated depthwise convolution")
    levels: int = doc(4, "convolutions per block; level i has dilation 2**i")

    def validate(self) -> None:
        check_ints(self, ("kernel", "levels"))


@dataclass
class LinearAttentionConfig(Config):
    """The expert's linear-attention block."""

    feature_map: str = doc("identity", "feature map: 'identity' or 'elu1' (elu(x)+1)")
    decay: str = doc("data", "decay: 'data' (input-dependent gate), 'fixed' (RetNet), 'none'")
    normalize: bool = doc(False, "divide by q.sum(k) (Katharopoulos); needs feature_map='elu1'")
    chunk_size: int = doc(64, "chunk length of the chunked form")

    def validate(self) -> None:
        check_ints(self, ("chunk_size",))
        check_choice(self, "feature_map", FEATURE_MAPS)
        check_choice(self, "decay", DECAYS)
        check(not self.normalize or self.feature_map == "elu1",
              "LinearAttentionConfig.normalize needs a positive feature map (feature_map='elu1'): "
              "with 'identity' the normalizer q.sum(k) can be zero or negative")


@dataclass
class SSMConfig(Config):
    """The summarizer's selective-SSM (Mamba-style) block."""

    state: int = doc(16, "state size N per channel")
    expand: int = doc(2, "inner width = expand * d_model")
    conv: int = doc(4, "taps of the short causal convolution before the scan")
    dt_rank: int = doc(0, "rank of the dt projection; 0 = ceil(d_model / 16)")
    chunk: int = doc(0, "chunk length of the two-level scan; 0 = about sqrt(T)")

    def validate(self) -> None:
        check_ints(self, ("state", "expand", "conv"))
        check_ints(self, ("dt_rank", "chunk"), minimum=0)


# --------------------------------------------------------------------------- LM configs
@dataclass
class LMConfig(Config):
    """What every causal LM has; the base of the per-architecture configs."""

    vocab_size: int = doc(8192, "vocabulary size (rows of the shared token embedding)")
    d_model: int = doc(256, "model width")
    n_layers: int = doc(4, "number of residual blocks")
    n_heads: int = doc(4, "attention / linear-attention heads (d_model must divide evenly)")
    mlp_hidden: int = doc(0, "SwiGLU hidden width; 0 = 8/3 * d_model rounded up to a multiple of 64")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon")
    dropout: float = doc(0.0, "dropout on each residual branch during training")
    init_std: float = doc(0.02, "std of the normal init of embeddings and projections")

    legacy: ClassVar[dict[str, str]] = {}
    """Old flat field -> ``"sub_config.field"`` (or ``"field"``) in this class; other legacy fields are dropped."""

    def validate(self) -> None:
        name = type(self).__name__
        check_ints(self, ("vocab_size", "d_model", "n_layers", "n_heads"))
        check_ints(self, ("mlp_hidden",), minimum=0)
        check(self.d_model % self.n_heads == 0,
              f"{name}.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check_range(self, ("dropout",), open_high=True)
        check(self.norm_eps > 0 and self.init_std > 0,
              f"{name}: norm_eps and init_std must be > 0 (got {self.norm_eps}, {self.init_std})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.mlp_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)

    def base(self) -> "LMConfig":
        """The shared part alone, as a plain :class:`LMConfig`."""
        return LMConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LMConfig)})

    @classmethod
    def coerce(cls: type[L], cfg: "LMConfig") -> L:
        """``cfg`` if it already is a ``cls``; else its shared fields with ``cls``'s own defaults.

        So a plain :class:`LMConfig` (or another architecture's config, as with the old union)
        builds any architecture; its architecture fields never leak into another one.
        """
        if isinstance(cfg, cls):
            return cfg
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LMConfig)})

    @classmethod
    def from_dict(cls: type[L], d: dict[str, Any], *, source: str = "config") -> L:
        """Strict ``from_dict`` that also reads the old flat union form (module docstring)."""
        if isinstance(d, dict) and any(k in LEGACY_FIELDS for k in d):
            d = _from_flat(cls.legacy, d)
        return super().from_dict(d, source=source)


def _from_flat(mapping: dict[str, str], d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in LEGACY_FIELDS}
    for k in LEGACY_FIELDS:
        if k not in d or k not in mapping:
            continue  # absent, or another architecture's field: dropped
        *parents, leaf = mapping[k].split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = d[k]
    return out


@dataclass
class ExpertLMConfig(LMConfig):
    """``expert_lm``: even layers TemporalConv, odd layers linear attention, all with a SwiGLU MLP."""

    conv: ConvConfig = doc(ConvConfig(), "the TemporalConv blocks")
    attention: LinearAttentionConfig = doc(LinearAttentionConfig(), "the linear-attention blocks")

    legacy: ClassVar[dict[str, str]] = {
        "conv_kernel": "conv.kernel", "conv_levels": "conv.levels", "la_feature_map": "attention.feature_map",
        "la_decay": "attention.decay", "la_normalize": "attention.normalize", "chunk_size": "attention.chunk_size",
    }


@dataclass
class SummarizerLMConfig(LMConfig):
    """``summarizer_lm``: every layer a selective-SSM mixer, no MLP (as in Mamba)."""

    ssm: SSMConfig = doc(SSMConfig(), "the SSM blocks")

    legacy: ClassVar[dict[str, str]] = {
        "ssm_state": "ssm.state", "ssm_expand": "ssm.expand", "ssm_conv": "ssm.conv", "ssm_dt_rank": "ssm.dt_rank",
        "ssm_chunk": "ssm.chunk",
    }

    @property
    def dt_rank(self) -> int:
        return self.ssm.dt_rank or math.ceil(self.d_model / 16)


@dataclass
class TransformerLMConfig(LMConfig):
    """``transformer_lm``: attention (RoPE, KV cache) + SwiGLU per layer; the attention baseline and DOE base."""

    rope_base: float = doc(10000.0, "rotary position embedding base")

    legacy: ClassVar[dict[str, str]] = {"rope_base": "rope_base"}

    def validate(self) -> None:
        super().validate()
        check(self.rope_base > 1, f"TransformerLMConfig.rope_base must be > 1, got {self.rope_base}")
