"""LoRA adapters of a pretrained backbone in PEFT's file layout: inject, save, load, switch per row.

On disk (what ``peft.PeftModel.from_pretrained(hf_model, folder)`` reads, and what
``PeftModel.save_pretrained`` writes)::

    <folder>/adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
                                         target_modules, base_model_name_or_path, bias "none", ...
    <folder>/adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight   (r, in)
                                         base_model.model.<HF module>.lora_B.weight   (out, r)

In memory the adapter is our :class:`~taskmoe.layers.lora.LoRALinear` on our Llama model
(:func:`~taskmoe.models.backbones.llama_lm`), so ``y = W x + (alpha / r) B A x`` exactly as PEFT
computes it; module names go through the explicit map of
:mod:`taskmoe.models.backbones.convert` (``blocks.3.mixer.q_proj`` <-> ``model.layers.3.self_attn.q_proj``).

Design choices:

- **Targets by leaf name** (``q_proj`` ... ``down_proj``, default all seven), as PEFT users write
  them; a target that wraps nothing is an error (:func:`~taskmoe.layers.lora.inject`).
- **Exact PEFT semantics or a clear refusal**: ``use_rslora`` (scale alpha / sqrt(r)) and
  ``rank_pattern`` / ``alpha_pattern`` (per-module r and alpha, PEFT's suffix-regex match) are
  read; DoRA, LoRA biases, ``modules_to_save``, ``fan_in_fan_out`` and other PEFT types are refused
  with the field named, since loading them as plain LoRA would silently change the model.
- **``target_modules`` on save** is the leaf names when every module with those names is wrapped,
  else the full module paths (so PEFT wraps exactly what we trained).
- The base weights are never written: an adapter folder holds only A and B.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors
from taskmoe.layers.lora import AdapterSpec, LoRALinear, inject, lora_layers, mark_only_adapter_trainable, set_adapter
from taskmoe.layers.quant import LINEAR_TYPES
from taskmoe.layers.multi_lora import row_adapters, set_row_adapters
from taskmoe.models.backbones.convert import hf_to_ours, ours_to_hf

__all__ = ["DEFAULT_TARGETS", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "inject_adapter", "save_adapter", "load_adapter",
           "set_active", "is_peft_adapter_dir", "mark_only_adapter_trainable", "adapter_files",
           "write_adapter_files"]

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_REFUSED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
            "modules_to_save": None, "layer_replication": None, "use_qalora": False}


def is_peft_adapter_dir(folder: str | Path) -> bool:
    """True for a folder holding a PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


def inject_adapter(model: nn.Module, name: str, r: int = 16, alpha: float = 32.0,
                   targets: Sequence[str] = DEFAULT_TARGETS, *, dropout: float = 0.0) -> list[str]:
    """Add LoRA adapter ``name`` (rank r, scale alpha / r) on every projection named in ``targets``.

    Returns the wrapped module names (ours). B starts at zero, so the model's outputs are unchanged
    until it trains. The base weights of wrapped layers are frozen (see
    :func:`mark_only_adapter_trainable` to freeze everything else too).
    """
    return inject(model, [re.escape(t) for t in targets], rank=r, alpha=alpha, adapter_name=name, dropout=dropout)


def set_active(model: nn.Module, adapters: str | None | Sequence[str | None]) -> None:
    """Switch adapters for the next forwards: one name for every row, None for the base model, or a
    sequence with one name (or None) per batch row (one forward, each row its own adapter; see
    :mod:`taskmoe.layers.multi_lora`). For decoding with per-row adapters use
    :class:`~taskmoe.models.mixed_adapters.MixedAdapterLM`, which keeps each row's choice in the state."""
    if adapters is None or isinstance(adapters, str):
        set_row_adapters(model, None)
        set_adapter(model, adapters)
    else:
        set_adapter(model, None)
        set_row_adapters(model, row_adapters(model, list(adapters), next(model.parameters()).device))


def _layers_of(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    layers = {n: m for n, m in lora_layers(model).items() if name in m.specs}
    if not layers:
        raise ConfigError(f"adapter '{name}' is not in this model")
    return layers


def _target_modules(model: nn.Module, wrapped: list[str]) -> list[str]:
    """Leaf names if they cover exactly the wrapped set, else the full Hugging Face module paths."""
    leaves = sorted({w.rsplit(".", 1)[-1] for w in wrapped})
    covered = {n for n, m in model.named_modules() if isinstance(m, (*LINEAR_TYPES, LoRALinear)) and n.rsplit(".", 1)[-1]
               in leaves and n != "lm_head"}
    return leaves if covered == set(wrapped) else sorted(ours_to_hf(w) for w in wrapped)


def adapter_files(model: nn.Module, name: str, *, base_model_name_or_path: str | None = None
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json contents, adapter_model.safetensors tensors)`` of adapter ``name`` in PEFT's layout."""
    layers = _layers_of(model, name)
    specs = {n: layer.specs[name] for n, layer in layers.items()}
    (r, alpha), _ = Counter((s.rank, s.alpha) for s in specs.values()).most_common(1)[0]
    dropout = max(s.dropout for s in specs.values())
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": _target_modules(model, list(layers)),
        "rank_pattern": {ours_to_hf(n): s.rank for n, s in specs.items() if s.rank != r},
        "alpha_pattern": {ours_to_hf(n): s.alpha for n, s in specs.items() if s.alpha != alpha},
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    for n, layer in layers.items():
        key = PEFT_PREFIX + ours_to_hf(n)
        tensors[f"{key}.lora_A.weight"] = layer.lora_A[name].detach()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B[name].detach()
    return config, tensors


def write_adapter_files(model: nn.Module, name: str, folder: str | Path, *,
                        base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name``'s two PEFT files into ``folder`` (an existing folder being built, e.g. by
    :func:`taskmoe.io.atomic_dir`; use :func:`save_adapter` for an atomic adapter folder of its own)."""
    config, tensors = adapter_files(model, name, base_model_name_or_path=base_model_name_or_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, config)
    return folder


def save_adapter(model: nn.Module, name: str, folder: str | Path, *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` of ``model`` as a PEFT adapter folder (atomically); return the folder."""
    _layers_of(model, name)  # fail before creating anything
    return atomic_dir(folder, lambda tmp: write_adapter_files(model, name, tmp,
                                                              base_model_name_or_path=base_model_name_or_path))


def _pattern_value(patterns: dict[str, Any], hf_module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern key matching the module name as a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", hf_module):
            return value
    return default


def _read_peft(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(config, {HF module: {"A": tensor, "B": tensor}}), refusing what is not plain LoRA."""
    cfg_path = folder / ADAPTER_CONFIG
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r} "
                              "is not supported (only LORA adapters)")
    for field, plain in _REFUSED.items():
        if cfg.get(field, plain) not in (plain, [], {}) and not (field == "bias" and cfg.get(field) is None):
            raise CheckpointError(f"{cfg_path}: {field}={cfg[field]!r} is not supported (plain LoRA needs "
                                  f"{field}={plain!r})")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_tensors(folder / ADAPTER_WEIGHTS).items():
        m = _KEY.match(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        if m is None:
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA A/B weight")
        modules.setdefault(m["module"], {})[m["ab"]] = t
    broken = [k for k, v in modules.items() if set(v) != {"A", "B"}]
    if broken or not modules:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: needs lora_A and lora_B for every module "
                              f"(incomplete: {broken[:4]}, modules: {len(modules)})")
    return cfg, modules


def load_adapter(model: nn.Module, folder: str | Path, *, name: str | None = None) -> str:
    """Load a PEFT LoRA adapter folder into our backbone model as adapter ``name`` (default: the folder name).

    Every module must exist in ``model`` as a linear layer whose sizes match A and B, else
    CheckpointError names the folder and each mismatch (nothing is injected then).
    """
    folder = Path(folder)
    if not is_peft_adapter_dir(folder):
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    name = name or folder.name
    cfg, modules = _read_peft(folder)
    present = dict(model.named_modules())
    plan: list[tuple[str, AdapterSpec, dict[str, torch.Tensor]]] = []
    problems: list[str] = []
    for hf_module, ab in modules.items():
        try:
            ours = hf_to_ours(hf_module)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        mod = present.get(ours)
        a, b = ab["A"], ab["B"]
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, hf_module, cfg.get("r", a.shape[0])))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, hf_module, cfg.get("lora_alpha", 8)))
        if not isinstance(mod, (*LINEAR_TYPES, LoRALinear)):
            problems.append(f"module {hf_module!r} ({ours}) is not a linear layer of this model")
        elif a.shape != (r, mod.in_features) or b.shape != (mod.out_features, r):
            problems.append(f"{hf_module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a rank-{r} adapter of "
                            f"a ({mod.in_features} -> {mod.out_features}) layer")
        elif isinstance(mod, LoRALinear) and name in mod.specs:
            problems.append(f"{ours} already has an adapter named {name!r}")
        else:
            if cfg.get("use_rslora"):
                alpha = alpha * r ** 0.5  # PEFT's rsLoRA scale alpha / sqrt(r) == (alpha sqrt(r)) / r
            plan.append((ours, AdapterSpec(r, alpha, float(cfg.get("lora_dropout") or 0.0)), ab))
    if problems:
        raise CheckpointError(f"{folder}: adapter does not fit this model: " + "; ".join(problems[:6]))
    for ours, spec, ab in plan:
        inject(model, [re.escape(ours)], rank=spec.rank, alpha=spec.alpha, adapter_name=name, dropout=spec.dropout)
        layer = model.get_submodule(ours)
        with torch.no_grad():
            layer.lora_A[name].copy_(ab["A"])
            layer.lora_B[name].copy_(ab["B"])
    return name
