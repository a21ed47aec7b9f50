"""Layers: modules built on :mod:`taskmoe.ops`, each owning only its projections and dispatch.

Sequence layers share one contract, ``forward(x, state=None) -> (y, state)`` plus
``init_state(batch, device, dtype)``: :class:`TemporalConv` (dilated causal TCN),
:class:`LinearAttention` (chunked, decaying), :class:`SSM` (selective scan), :class:`Attention`
(fused qkv) and :class:`GQAttention` (grouped-query heads, Llama layout), both with RoPE
(:mod:`taskmoe.layers.rope`) and a KV cache. Plain layers: :class:`RMSNorm`, :class:`SwiGLU`, :class:`GatedMLP`.
:class:`Block` is the pre-norm residual wrapper ``x + mixer(norm(x))`` (+ MLP), built by injection.
States (:mod:`taskmoe.layers.state`) are explicit values that select/cat/clone by row.
:mod:`taskmoe.layers.lora` holds our own LoRA (inject, switch, merge, save; per-row adapter masks for exact
mixed batches), on the layer :class:`~taskmoe.layers.lora_linear.LoRALinear`.
"""

from taskmoe.layers.attention import Attention, GQAttention, KVCache
from taskmoe.layers.block import Block, BlockState, is_stateful
from taskmoe.layers.conv import ConvState, TemporalConv
from taskmoe.layers.linear_attention import DataDecay, FixedDecay, LinearAttention, LinearAttentionState, elu_plus_one
from taskmoe.layers.mlp import GatedMLP, SwiGLU
from taskmoe.layers.norm import RMSNorm
from taskmoe.layers.ssm import SSM, SSMState
from taskmoe.layers.state import LMState, TensorState, cat_states, clone_state, select_state

__all__ = [
    "Attention", "GQAttention", "KVCache", "GatedMLP", "Block", "BlockState", "is_stateful", "ConvState", "TemporalConv", "DataDecay",
    "FixedDecay", "LinearAttention", "LinearAttentionState", "elu_plus_one", "SwiGLU", "RMSNorm", "SSM", "SSMState",
    "LMState", "TensorState", "cat_states", "clone_state", "select_state",
]
