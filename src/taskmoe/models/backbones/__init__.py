"""Pretrained Llama-family backbones as first-class models of the one LM interface (the litgpt way).

- :mod:`~taskmoe.models.backbones.config`: :class:`LlamaConfig`, read from a Hugging Face config.json;
- :mod:`~taskmoe.models.backbones.llama`: :func:`llama_lm`, our own model from our layers
  (grouped-query attention with RoPE and KV cache, SwiGLU, RMSNorm, tied or untied head);
- :mod:`~taskmoe.models.backbones.convert`: the explicit Hugging Face <-> ours name map;
- :mod:`~taskmoe.models.backbones.load`: :func:`import_backbone` (GGUF or HF folder -> backbone
  folder, via transformers) and :func:`load_backbone` (backbone folder -> our model + tokenizer,
  via safetensors only).
"""

from taskmoe.models.backbones.config import SUPPORTED, LlamaConfig
from taskmoe.models.backbones.convert import convert_hf_state_dict, export_state_dict, hf_to_ours, ours_to_hf
from taskmoe.models.backbones.llama import llama_lm
from taskmoe.models.backbones.load import import_backbone, is_backbone_dir, load_backbone, read_backbone_config

__all__ = [
    "SUPPORTED", "LlamaConfig", "convert_hf_state_dict", "export_state_dict", "hf_to_ours", "ours_to_hf", "llama_lm",
    "import_backbone", "is_backbone_dir", "load_backbone", "read_backbone_config",
]
