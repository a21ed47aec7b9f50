"""The explicit name map between Hugging Face Llama-family checkpoints and our :func:`llama_lm` (both ways).

Module paths (a parameter name is a module path + ``.weight`` / ``.bias``)::

    Hugging Face                                   ours
    model.embed_tokens                             embedding
    model.layers.{i}.input_layernorm               blocks.{i}.norm1
    model.layers.{i}.self_attn.{q,k,v,o}_proj      blocks.{i}.mixer.{q,k,v,o}_proj
    model.layers.{i}.post_attention_layernorm      blocks.{i}.norm2
    model.layers.{i}.mlp.{gate,up,down}_proj       blocks.{i}.mlp.{gate,up,down}_proj
    model.norm                                     norm
    lm_head                                        lm_head          (untied heads only)

:func:`hf_to_ours` / :func:`ours_to_hf` map one name (parameter or module path; PEFT adapters use
the module paths), :func:`convert_hf_state_dict` / :func:`export_state_dict` whole state dicts.
A tied checkpoint's ``lm_head.weight`` (the embedding again) is dropped on the way in and
omitted on the way out, as ``transformers`` saves it. Rotary ``inv_freq`` buffers are computed,
never loaded. A name outside the map is an error listing it, never silently skipped.
"""

from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor

from taskmoe.errors import CheckpointError
from taskmoe.models.backbones.config import LlamaConfig

MODULE_MAP: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens", "embedding"),
    ("model.layers.{i}.input_layernorm", "blocks.{i}.norm1"),
    ("model.layers.{i}.self_attn", "blocks.{i}.mixer"),
    ("model.layers.{i}.post_attention_layernorm", "blocks.{i}.norm2"),
    ("model.layers.{i}.mlp", "blocks.{i}.mlp"),
    ("model.norm", "norm"),
    ("lm_head", "lm_head"),
)
"""(Hugging Face module prefix, our module prefix); ``{i}`` is the layer index."""


def _prefix_regex(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"(?=\.|$)")


_HF = [(_prefix_regex(h), o) for h, o in MODULE_MAP]
_OURS = [(_prefix_regex(o), h) for h, o in MODULE_MAP]


def _map(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.replace("{i}", m.groupdict().get("i") or "") + name[m.end():]
    return None


def _map_or_raise(name: str, table: list[tuple[re.Pattern[str], str]], side: int, what: str) -> str:
    out = _map(name, table)
    if out is None:
        raise CheckpointError(f"{name!r} is not {what} (known prefixes: {[pair[side] for pair in MODULE_MAP]})")
    return out


def hf_to_ours(name: str) -> str:
    """Our name for a Hugging Face parameter or module name (CheckpointError if outside the map)."""
    return _map_or_raise(name, _HF, 0, "a Llama-family module name")


def ours_to_hf(name: str) -> str:
    """The Hugging Face name for one of our parameter or module names (CheckpointError if outside the map)."""
    return _map_or_raise(name, _OURS, 1, "a module of our Llama model")


def convert_hf_state_dict(hf: Mapping[str, Tensor], cfg: LlamaConfig, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """A Hugging Face state dict -> ours (the tied ``lm_head.weight`` and rotary buffers dropped)."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for name, t in hf.items():
        if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        ours = _map(name, _HF)
        if ours is None:
            unknown.append(name)
        else:
            out[ours] = t
    if unknown:
        raise CheckpointError(f"{source}: tensors outside the Llama-family name map: {unknown[:6]}"
                              + (f" (+{len(unknown) - 6} more)" if len(unknown) > 6 else ""))
    return out


def export_state_dict(ours: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> Hugging Face names (a tied model has no ``lm_head``, as transformers saves it)."""
    return {ours_to_hf(k): v for k, v in ours.items()}
