"""Whole language models, all speaking one interface: ``forward(ids, state=None) -> LMOutput``
(logits, the next explicit :class:`~taskmoe.layers.LMState`, final hidden states).

:class:`CausalLM` (embedding -> injected blocks -> norm -> tied head), the builders
:func:`expert_lm` (TCN + linear attention), :func:`summarizer_lm` (selective SSM) and
:func:`transformer_lm` (attention + SwiGLU, the DOE base), :data:`BUILDERS` by saved name, and
:func:`save_lm` / :func:`load_lm` for component folders. Configs: the shared :class:`LMConfig` and
one per architecture (:class:`ExpertLMConfig`, :class:`SummarizerLMConfig`, :class:`TransformerLMConfig`).

Pretrained backbones (:mod:`taskmoe.models.backbones`: Llama-family checkpoints as our own
``CausalLM``, import from GGUF / Hugging Face folders), their PEFT-layout LoRA adapters
(:mod:`taskmoe.models.adapters`) and many adapters in one batch
(:mod:`taskmoe.models.mixed_adapters`) are imported from their modules.
"""

from taskmoe.models.builders import BUILDERS, CONFIGS, build_lm, expert_lm, summarizer_lm, transformer_lm
from taskmoe.models.checkpoint import load_lm, save_lm
from taskmoe.models.config import (
    ConvConfig,
    ExpertLMConfig,
    LinearAttentionConfig,
    LMConfig,
    SSMConfig,
    SummarizerLMConfig,
    TransformerLMConfig,
)
from taskmoe.models.model import CausalLM, LMOutput, init_lm_weights

__all__ = [
    "BUILDERS", "CONFIGS", "build_lm", "expert_lm", "summarizer_lm", "transformer_lm", "load_lm", "save_lm", "LMConfig",
    "ExpertLMConfig", "SummarizerLMConfig", "TransformerLMConfig", "ConvConfig", "LinearAttentionConfig", "SSMConfig",
    "CausalLM", "LMOutput", "init_lm_weights",
]
