"""Builders: an architecture's config (and optionally a shared embedding) in, a ready ``CausalLM`` out.

- :func:`expert_lm` — the IMoE expert: blocks alternate a :class:`TemporalConv` (TCN) mixer and a
  :class:`LinearAttention` mixer, each followed by a SwiGLU MLP. The TCN gives local order (so no
  positional embedding is needed); linear attention gives decaying long-range memory. Decoding
  costs the same at any context length.
- :func:`summarizer_lm` — the IMoE summarizer: Mamba-style :class:`SSM` mixers (no MLP, as in Mamba).
- :func:`transformer_lm` — the attention baseline and the DOE base: :class:`Attention` (RoPE, KV
  cache) + an MLP per layer; ``mlp_factory(layer_index) -> nn.Module`` swaps in another MLP
  (for example a sequence-routed MoE layer), which may itself carry decoding state.

Each builder takes its own config (:class:`ExpertLMConfig`, :class:`SummarizerLMConfig`,
:class:`TransformerLMConfig`); a plain :class:`LMConfig` is upgraded with that architecture's
defaults (:meth:`LMConfig.coerce`). Passing ``embedding`` shares it (its weights are kept as they
are); otherwise a new one is created and initialized. :data:`BUILDERS` maps the name stored in a
checkpoint to its builder and :data:`CONFIGS` to its config class.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from taskmoe.errors import ConfigError
from taskmoe.layers.attention import Attention
from taskmoe.layers.block import Block
from taskmoe.models.config import ExpertLMConfig, LMConfig, SummarizerLMConfig, TransformerLMConfig
from taskmoe.layers.conv import TemporalConv
from taskmoe.layers.linear_attention import FEATURE_MAPS, DataDecay, FixedDecay, LinearAttention
from taskmoe.layers.mlp import SwiGLU
from taskmoe.models.model import CausalLM, init_lm_weights
from taskmoe.layers.norm import RMSNorm
from taskmoe.layers.ssm import SSM

MixerFactory = Callable[[int], nn.Module]


def _embedding(cfg: LMConfig, embedding: nn.Embedding | None) -> tuple[nn.Embedding, bool]:
    if embedding is None:
        return nn.Embedding(cfg.vocab_size, cfg.d_model), True
    want = (cfg.vocab_size, cfg.d_model)
    got = (embedding.num_embeddings, embedding.embedding_dim)
    if got != want:
        raise ConfigError(f"shared embedding is {got[0]} x {got[1]} but LMConfig asks for vocab_size x d_model = "
                          f"{want[0]} x {want[1]}")
    return embedding, False


def build_lm(cfg: LMConfig, mixer: MixerFactory, mlp: Callable[[int], nn.Module | None],
             embedding: nn.Embedding | None = None, *, builder: str | None = None) -> CausalLM:
    """Generic assembly: ``Block(mixer(i), mlp(i))`` for each layer i, GPT-2-style init."""
    emb, fresh = _embedding(cfg, embedding)
    blocks = [Block(mixer(i), mlp(i), d_model=cfg.d_model, eps=cfg.norm_eps, dropout=cfg.dropout)
              for i in range(cfg.n_layers)]
    model = CausalLM(emb, blocks, RMSNorm(cfg.d_model, cfg.norm_eps), config=cfg, builder=builder)
    for blk in model.blocks:
        init_lm_weights(blk, cfg.init_std, cfg.n_layers)
    if fresh:
        init_lm_weights(emb, cfg.init_std, cfg.n_layers)
    return model


def _swiglu(cfg: LMConfig) -> Callable[[int], nn.Module]:
    return lambda i: SwiGLU(cfg.d_model, cfg.mlp_dim)


def linear_attention_mixer(cfg: ExpertLMConfig) -> LinearAttention:
    la = cfg.attention
    decay = {"data": lambda: DataDecay(cfg.d_model, cfg.n_heads), "fixed": lambda: FixedDecay(cfg.n_heads),
             "none": lambda: None}[la.decay]()
    return LinearAttention(cfg.d_model, cfg.n_heads, feature_map=FEATURE_MAPS[la.feature_map], decay=decay,
                           normalize=la.normalize, chunk_size=la.chunk_size, eps=cfg.norm_eps)


def expert_lm(cfg: ExpertLMConfig | LMConfig, embedding: nn.Embedding | None = None) -> CausalLM:
    """TCN + linear attention LM: even layers TemporalConv, odd layers LinearAttention, all + SwiGLU."""
    cfg = ExpertLMConfig.coerce(cfg)

    def mixer(i: int) -> nn.Module:
        if i % 2 == 0:
            return TemporalConv(cfg.d_model, kernel_size=cfg.conv.kernel, n_levels=cfg.conv.levels)
        return linear_attention_mixer(cfg)

    return build_lm(cfg, mixer, _swiglu(cfg), embedding, builder="expert_lm")


def summarizer_lm(cfg: SummarizerLMConfig | LMConfig, embedding: nn.Embedding | None = None) -> CausalLM:
    """Selective-SSM (Mamba-style) LM: every layer an SSM mixer, no MLP."""
    cfg = SummarizerLMConfig.coerce(cfg)

    def mixer(i: int) -> nn.Module:
        s = cfg.ssm
        return SSM(cfg.d_model, d_state=s.state, expand=s.expand, d_conv=s.conv, dt_rank=cfg.dt_rank,
                   chunk_size=s.chunk or None)

    return build_lm(cfg, mixer, lambda i: None, embedding, builder="summarizer_lm")


def transformer_lm(cfg: TransformerLMConfig | LMConfig, embedding: nn.Embedding | None = None, *,
                   mlp_factory: Callable[[int], nn.Module] | None = None) -> CausalLM:
    """Attention (RoPE + KV cache) + SwiGLU per layer; ``mlp_factory(i)`` replaces layer i's MLP.

    A model built with a custom ``mlp_factory`` has no builder name (``save_lm`` refuses it: its
    owner saves it, since only the owner can rebuild the MLPs).
    """
    cfg = TransformerLMConfig.coerce(cfg)
    mixer = lambda i: Attention(cfg.d_model, cfg.n_heads, rope_base=cfg.rope_base)  # noqa: E731
    return build_lm(cfg, mixer, mlp_factory or _swiglu(cfg), embedding,
                    builder="transformer_lm" if mlp_factory is None else None)


BUILDERS: dict[str, Callable[..., CausalLM]] = {
    "expert_lm": expert_lm,
    "summarizer_lm": summarizer_lm,
    "transformer_lm": transformer_lm,
}

CONFIGS: dict[str, type[LMConfig]] = {
    "expert_lm": ExpertLMConfig,
    "summarizer_lm": SummarizerLMConfig,
    "transformer_lm": TransformerLMConfig,
}
