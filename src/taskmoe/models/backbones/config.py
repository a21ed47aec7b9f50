"""``LlamaConfig``: the architecture of a pretrained Llama-family backbone, read from a Hugging Face ``config.json``.

One config for the decoder-only transformers that share Llama's block (pre-norm RMSNorm,
grouped-query attention with RoPE, SwiGLU MLP): :data:`SUPPORTED` maps each supported
``architectures`` entry to its ``model_type`` and to what differs (Qwen2 has q/k/v biases;
Mistral and Qwen2 are accepted only without a sliding window, which we do not implement).
:meth:`LlamaConfig.from_hf` reads both the transformers 4 layout (``rope_theta`` +
``rope_scaling``) and the transformers 5 layout (``rope_parameters``), and refuses what it cannot
run exactly (another activation, partial rotary, an unknown RoPE type) with a message naming the
file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from taskmoe.config import Config, check, doc
from taskmoe.errors import ConfigError
from taskmoe.layers.rope import ROPE_TYPES, RopeScaling

SUPPORTED: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
"""Supported Hugging Face architectures -> their ``model_type``."""


@dataclass
class LlamaConfig(Config):
    vocab_size: int = doc(32000, "vocabulary size (rows of the token embedding)")
    hidden_size: int = doc(576, "model width d")
    intermediate_size: int = doc(1536, "SwiGLU hidden width")
    num_hidden_layers: int = doc(30, "number of decoder blocks")
    num_attention_heads: int = doc(9, "query heads H")
    num_key_value_heads: int = doc(3, "key/value heads G (H must be a multiple of G; G = H is plain multi-head)")
    head_dim: int = doc(64, "size of each attention head")
    rms_norm_eps: float = doc(1e-5, "RMSNorm epsilon: x / sqrt(mean(x^2) + eps) * weight")
    rope_theta: float = doc(10000.0, "RoPE base theta")
    rope_scaling: RopeScaling | None = doc(None, "RoPE frequency scaling (None, 'linear' or 'llama3')")
    max_position_embeddings: int = doc(2048, "longest context the checkpoint was trained for")
    tie_word_embeddings: bool = doc(True, "the output head is the token embedding")
    qkv_bias: bool = doc(False, "q/k/v projections have biases (Qwen2, Llama attention_bias)")
    o_bias: bool = doc(False, "the attention output projection has a bias (Llama attention_bias)")
    mlp_bias: bool = doc(False, "the MLP projections have biases (Llama mlp_bias)")
    bos_token_id: int | None = doc(None, "beginning-of-sequence token id")
    eos_token_id: list[int] = doc([], "end-of-sequence token ids (generation stops on any)")
    architecture: str = doc("LlamaForCausalLM", f"Hugging Face architecture, one of {sorted(SUPPORTED)}")

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling, source="LlamaConfig.rope_scaling")
        super().__post_init__()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                  f"LlamaConfig.{name} must be a positive integer, got {v!r}")
        check(self.num_attention_heads % self.num_key_value_heads == 0,
              f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
              f"num_key_value_heads ({self.num_key_value_heads})")
        check(self.head_dim % 2 == 0, f"LlamaConfig.head_dim must be even (rotary pairs), got {self.head_dim}")
        check(self.rms_norm_eps > 0 and self.rope_theta > 1,
              f"LlamaConfig: rms_norm_eps must be > 0 and rope_theta > 1 (got {self.rms_norm_eps}, {self.rope_theta})")
        check(self.architecture in SUPPORTED,
              f"LlamaConfig.architecture {self.architecture!r} is not supported; supported: {sorted(SUPPORTED)}")

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> "LlamaConfig":
        """Read a Hugging Face ``config.json`` dict; ConfigError naming ``source`` and the field otherwise."""
        arch = _architecture(raw, source)
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Llama-family blocks use 'silu')")
        window = raw.get("sliding_window") if raw.get("use_sliding_window", arch != "Qwen2ForCausalLM") else None
        layer_types = set(raw.get("layer_types") or ["full_attention"])
        if window is not None and window < raw.get("max_position_embeddings", 0) or layer_types != {"full_attention"}:
            raise ConfigError(f"{source}: sliding-window attention (sliding_window={window}, layer_types="
                              f"{sorted(layer_types)}) is not supported; only full attention")
        theta, scaling = _rope(raw, source)
        heads = int(raw["num_attention_heads"])
        eos = raw.get("eos_token_id")
        attention_bias = bool(raw.get("attention_bias", False))
        try:
            return cls(
                vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]), num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads, num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch != "LlamaForCausalLM")),
                qkv_bias=attention_bias or arch == "Qwen2ForCausalLM", o_bias=attention_bias,
                mlp_bias=bool(raw.get("mlp_bias", False)), bos_token_id=raw.get("bos_token_id"),
                eos_token_id=[] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])],
                architecture=arch)
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from e
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e


def _architecture(raw: Mapping[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    by_type = {t: a for a, t in SUPPORTED.items()}
    arch = next((a for a in archs if a in SUPPORTED), None) or (None if archs else by_type.get(raw.get("model_type")))
    if arch is None:
        raise ConfigError(f"{source}: architecture {archs or raw.get('model_type')!r} is not supported; "
                          f"supported architectures: {sorted(SUPPORTED)}")
    return arch


def _rope(raw: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{source}: partial rotary embeddings are not supported")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: RoPE type {kind!r} is not supported; supported: {list(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    known = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    kw = {k: v for k, v in params.items() if k in known}
    return theta, RopeScaling.from_dict({"rope_type": kind, **kw}, source=f"{source}: rope scaling")
