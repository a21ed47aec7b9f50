"""Layers and language models built on :mod:`taskmoe.ops`.

Layers (each a sequence module ``forward(x, state=None) -> (y, state)`` with ``init_state``):
:class:`TemporalConv`, :class:`LinearAttention`, :class:`SSM`, :class:`Attention`; plain layers:
:class:`RMSNorm`, :class:`SwiGLU`, :class:`Linear`. Models: :class:`Block`, :class:`CausalLM`
(explicit :class:`LMState`), builders :func:`expert_lm`, :func:`summarizer_lm`,
:func:`transformer_lm`, and :func:`save_lm` / :func:`load_lm`.
"""

from taskmoe.nn.attention import Attention, KVCache
from taskmoe.nn.block import Block, BlockState, is_stateful
from taskmoe.nn.builders import BUILDERS, build_lm, expert_lm, summarizer_lm, transformer_lm
from taskmoe.nn.checkpoint import load_lm, save_lm
from taskmoe.nn.config import LMConfig
from taskmoe.nn.conv import ConvState, TemporalConv
from taskmoe.nn.linear import Linear, clear_decode_cache, decode_weight_cache
from taskmoe.nn.linear_attention import DataDecay, FixedDecay, LinearAttention, LinearAttentionState, elu_plus_one
from taskmoe.nn.mlp import SwiGLU
from taskmoe.nn.model import CausalLM, LMOutput, init_lm_weights
from taskmoe.nn.norm import RMSNorm
from taskmoe.nn.ssm import SSM, SSMState
from taskmoe.nn.state import LMState, TensorState

__all__ = [
    "Attention", "KVCache", "Block", "BlockState", "is_stateful", "BUILDERS", "build_lm", "expert_lm",
    "summarizer_lm", "transformer_lm", "load_lm", "save_lm", "LMConfig", "ConvState", "TemporalConv", "Linear",
    "decode_weight_cache", "clear_decode_cache", "DataDecay", "FixedDecay", "LinearAttention", "LinearAttentionState", "elu_plus_one",
    "SwiGLU", "CausalLM", "LMOutput", "init_lm_weights", "RMSNorm", "SSM", "SSMState", "LMState", "TensorState",
]
