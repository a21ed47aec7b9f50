"""Our own Llama-family model (the litgpt way): a :class:`~taskmoe.models.CausalLM` built from our layers.

Each of ``num_hidden_layers`` blocks is the shared pre-norm :class:`~taskmoe.layers.Block`::

    x = x + GQAttention(RMSNorm(x))     # grouped-query attention, RoPE as configured, KV cache
    x = x + GatedMLP(RMSNorm(x))        # down(silu(gate(x)) * up(x))

then a final RMSNorm and the head (the embedding when ``tie_word_embeddings``, else ``lm_head``).
So a backbone is just another model of the one LM interface: ``forward(ids, state) -> LMOutput``,
states that select/cat/clone by row (KV caches with per-row lengths: ragged batches decode
exactly), and every loop written for ``CausalLM`` (generate, serving, eval, LoRA) runs on it.

Module names: the projections keep Hugging Face's leaf names (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) under our block layout
(``blocks.{i}.mixer.q_proj``, ``blocks.{i}.mlp.gate_proj``); :mod:`taskmoe.models.backbones.convert`
holds the explicit name map both ways (checkpoints and PEFT adapters).

Glossary: d = hidden_size, H = num_attention_heads, G = num_key_value_heads, V = vocab_size.
"""

from __future__ import annotations

from torch import nn

from taskmoe.layers.attention import GQAttention
from taskmoe.layers.block import Block
from taskmoe.layers.mlp import GatedMLP
from taskmoe.layers.norm import RMSNorm
from taskmoe.models.backbones.config import LlamaConfig
from taskmoe.models.model import CausalLM, init_lm_weights

BUILDER = "llama"


def llama_lm(cfg: LlamaConfig, *, init: bool = True, init_std: float = 0.02) -> CausalLM:
    """A Llama-family ``CausalLM`` for ``cfg``; ``init`` gives it GPT-2-style random weights (skip it
    when a checkpoint is loaded next)."""
    d = cfg.hidden_size

    def block() -> Block:
        attn = GQAttention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                           rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, qkv_bias=cfg.qkv_bias,
                           o_bias=cfg.o_bias)
        return Block(attn, GatedMLP(d, cfg.intermediate_size, bias=cfg.mlp_bias), d_model=d, eps=cfg.rms_norm_eps)

    head = None if cfg.tie_word_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
    model = CausalLM(nn.Embedding(cfg.vocab_size, d), [block() for _ in range(cfg.num_hidden_layers)],
                     RMSNorm(d, cfg.rms_norm_eps), config=cfg, builder=BUILDER, lm_head=head)
    if init:
        init_lm_weights(model, init_std, cfg.num_hidden_layers)
    return model
