"""``LMConfig``: the one config every language model builder in :mod:`taskmoe.models.builders` reads.

Each builder uses the fields that concern its blocks (``conv_*``/``la_*`` for the expert,
``ssm_*`` for the summarizer, ``rope_base`` for the transformer) and ignores the rest, so one
config file describes any of the three and the saved ``config.json`` names the builder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from taskmoe.config import Config, check, doc

FEATURE_MAPS = ("identity", "elu1")
DECAYS = ("data", "fixed", "none")


@dataclass
class LMConfig(Config):
    vocab_size: int = doc(8192, "vocabulary size (rows of the shared token embedding)")
    d_model: int = doc(256, "model width")
    n_layers: int = doc(4, "number of residual blocks")
    n_heads: int = doc(4, "attention / linear-attention heads (d_model must divide evenly)")
    mlp_hidden: int = doc(0, "SwiGLU hidden width; 0 = 8/3 * d_model rounded up to a multiple of 64")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon")
    dropout: float = doc(0.0, "dropout on each residual branch during training")
    init_std: float = doc(0.02, "std of the normal init of embeddings and projections")
    # expert (TCN + linear attention)
    conv_kernel: int = doc(3, "taps of each dilated depthwise convolution in a TemporalConv block")
    conv_levels: int = doc(4, "convolutions per TemporalConv block; level i has dilation 2**i")
    la_feature_map: str = doc("identity", "linear-attention feature map: 'identity' or 'elu1' (elu(x)+1)")
    la_decay: str = doc("data", "linear-attention decay: 'data' (input-dependent gate), 'fixed' (RetNet), 'none'")
    la_normalize: bool = doc(False, "divide by q.sum(k) (Katharopoulos); needs la_feature_map='elu1'")
    chunk_size: int = doc(64, "chunk length of the chunked linear-attention form")
    # summarizer (selective SSM)
    ssm_state: int = doc(16, "SSM state size N per channel")
    ssm_expand: int = doc(2, "SSM inner width = ssm_expand * d_model")
    ssm_conv: int = doc(4, "taps of the short causal convolution before the scan")
    ssm_dt_rank: int = doc(0, "rank of the dt projection; 0 = ceil(d_model / 16)")
    ssm_chunk: int = doc(0, "chunk length of the two-level scan; 0 = about sqrt(T)")
    # transformer baseline
    rope_base: float = doc(10000.0, "rotary position embedding base of the attention baseline")

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "conv_kernel", "conv_levels", "chunk_size",
                     "ssm_state", "ssm_expand", "ssm_conv"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"LMConfig.{name} must be a positive integer, got {v!r}")
        for name in ("mlp_hidden", "ssm_dt_rank", "ssm_chunk"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"LMConfig.{name} must be an integer >= 0, got {v!r}")
        check(self.d_model % self.n_heads == 0,
              f"LMConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check(0.0 <= self.dropout < 1.0, f"LMConfig.dropout must be in [0, 1), got {self.dropout}")
        check(self.norm_eps > 0 and self.init_std > 0 and self.rope_base > 1,
              f"LMConfig: norm_eps, init_std must be > 0 and rope_base > 1 "
              f"(got {self.norm_eps}, {self.init_std}, {self.rope_base})")
        check(self.la_feature_map in FEATURE_MAPS,
              f"LMConfig.la_feature_map must be one of {FEATURE_MAPS}, got {self.la_feature_map!r}")
        check(self.la_decay in DECAYS, f"LMConfig.la_decay must be one of {DECAYS}, got {self.la_decay!r}")
        check(not self.la_normalize or self.la_feature_map == "elu1",
              "LMConfig.la_normalize needs a positive feature map (la_feature_map='elu1'): "
              "with 'identity' the normalizer q.sum(k) can be zero or negative")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.mlp_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def dt_rank(self) -> int:
        return self.ssm_dt_rank or math.ceil(self.d_model / 16)
