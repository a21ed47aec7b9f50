"""LoRA adapters for our plain ``nn.Module`` models: inject, switch per call, merge, save, load.

The layer itself (:class:`~taskmoe.layers.lora_linear.LoRALinear`: ``y = x W^T + b + s *
dropout(x) A^T B^T`` with ``s = alpha / r``, several named adapters, bit-exact unmerge, row
masks) lives in :mod:`taskmoe.layers.lora_linear` and is re-exported here, so
``from taskmoe.layers.lora import LoRALinear`` keeps working. This module holds what acts on a
whole model.

Why our own ``LoRALinear`` rather than ``peft``: peft's ``LoraModel`` is built around HF-style
models and its own config/save machinery (``adapter_config.json``, ``PeftModel`` wrappers,
``disable_adapter`` on the wrapper), while our models are plain ``nn.Module``\\ s with explicit
decode state; we need adapters stored as *our* component folders (safetensors + JSON through
:mod:`taskmoe.io`), a per-call switch on one shared base model (the summarizer runs with the
coding adapter only on coding intent), an exact row mask for mixed batches, and peft is only an
optional extra, not a core dependency. The whole mechanism is ~one small class.

Design choices:

- **Target matching**: a pattern matches a module name if the regex fully matches the name or
  any dotted suffix of it (``"in_proj"`` matches ``blocks.3.mixer.in_proj``;
  ``r"blocks\\.[01]\\..*proj"`` matches by full name). Only ``nn.Linear`` modules are
  wrapped. A pattern that wraps nothing is an error naming the pattern (and what it did match).
- **State dicts**: stripping the ``lora_`` keys (:func:`base_state_dict`) gives exactly the state
  dict of the un-injected model; :func:`adapter_state_dict` is one adapter's tensors alone.
- **Switching**: :func:`set_adapter` / :func:`use_adapter` set the active adapter (or none) on
  every layer at once, optionally for a boolean row mask (rows outside it get exactly the base
  output); :func:`merge_adapter` is idempotent and :func:`unmerge_adapter` bit-exact.
- **On disk**: :func:`save_adapter` writes a component folder (``config.json`` with each
  module's rank/alpha/dropout/in/out + ``model.safetensors``); :func:`load_adapter` checks every
  module and shape before changing the model and names each mismatch.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import load_component, save_component
from taskmoe.layers.lora_linear import AdapterSpec, LoRALinear
from taskmoe.layers.quant import LINEAR_TYPES

__all__ = [
    "LoRALinear",
    "AdapterSpec",
    "inject",
    "adapter_names",
    "adapter_state_dict",
    "base_state_dict",
    "lora_layers",
    "mark_only_adapter_trainable",
    "train_only",
    "set_adapter",
    "use_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "save_adapter",
    "load_adapter",
    "remove_adapters",
]

ADAPTER_KIND = "lora_adapter"


# ------------------------------------------------------------------------------ helpers
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in ``model`` (sorted)."""
    return sorted({a for m in lora_layers(model).values() for a in m.specs})


def _layers_with(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    layers = {n: m for n, m in lora_layers(model).items() if name in m.specs}
    if not layers:
        raise ConfigError(f"adapter '{name}' is not in this model (it has {adapter_names(model)})")
    return layers


def _pattern_matches(pattern: re.Pattern[str], name: str) -> bool:
    return pattern.fullmatch(name) is not None


def _compile(targets: list[str]) -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for t in targets:
        try:
            out.append((t, re.compile(rf"(?:.*\.)?(?:{t})")))  # full name or any dotted suffix
        except re.error as e:
            raise ConfigError(f"LoRA target {t!r} is not a valid regular expression ({e})") from e
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(
    model: nn.Module,
    targets: list[str],
    rank: int = 8,
    alpha: float = 16.0,
    adapter_name: str = "default",
    *,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every ``nn.Linear`` whose name matches a pattern in ``targets``; return their names.

    A module already wrapped gets the new adapter added. Raises ConfigError naming every pattern
    that wrapped nothing (and, if it matched non-linear modules, which ones), before changing
    anything. The wrapped layers' base weights are frozen; other parameters are untouched (see
    :func:`mark_only_adapter_trainable`).
    """
    if not targets:
        raise ConfigError("inject: 'targets' is empty; name at least one module pattern")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
        raise ConfigError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
    pats = _compile(targets)
    modules = dict(model.named_modules())
    wrapped_children = {f"{n}.{c}" for n, m in modules.items() if isinstance(m, LoRALinear) for c, _ in m.named_modules() if c}
    hits: dict[str, list[str]] = {t: [] for t in targets}
    other: dict[str, list[str]] = {t: [] for t in targets}
    for name, mod in modules.items():
        if not name or name in wrapped_children:
            continue
        for t, p in pats:
            if _pattern_matches(p, name):
                (hits if isinstance(mod, (*LINEAR_TYPES, LoRALinear)) else other)[t].append(name)
    missing = [t for t in targets if not hits[t]]
    if missing:
        detail = "; ".join(
            f"{t!r}" + (f" (matched only non-linear modules {other[t][:4]})" if other[t] else "") for t in missing
        )
        raise ConfigError(f"inject: LoRA target pattern(s) matched no nn.Linear module: {detail}")
    names = sorted({n for t in targets for n in hits[t]}, key=list(modules).index)
    already = [n for n in names if isinstance(modules[n], LoRALinear) and adapter_name in modules[n].specs]
    if already:
        raise ConfigError(f"inject: adapter '{adapter_name}' already exists on {already[:4]}")
    for n in names:
        _wrap(model, n).add_adapter(adapter_name, rank, alpha, dropout)
    return names


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    """The LoRALinear at ``name``, wrapping the nn.Linear there first if needed."""
    mod = model.get_submodule(name)
    if isinstance(mod, LoRALinear):
        return mod
    weight = getattr(mod, "weight", None)  # an Int4Linear has none (and shares nothing)
    owners = sum(1 for m in model.modules() for p in m.parameters(recurse=False) if weight is not None and p is weight)
    layer = LoRALinear(mod)
    layer.weight_shared = owners > 1
    _set_submodule(model, name, layer)
    return layer


# ---------------------------------------------------------------------------- switching
def set_adapter(model: nn.Module, name: str | None, rows: torch.Tensor | None = None) -> None:
    """Activate adapter ``name`` on every layer that has it (None: every adapter off).

    ``rows`` (bool, shape (B,)) applies the adapter only to those batch rows; the others get
    exactly the base output. Layers without adapter ``name`` are switched off.
    """
    if name is not None:
        _layers_with(model, name)  # raises if unknown
    if rows is not None:
        rows = rows.to(torch.bool).reshape(-1)
    for layer in lora_layers(model).values():
        if name is not None and name in layer.specs:
            layer.set_active(name)
            layer.row_mask = rows
        else:
            layer.set_active(None)
            layer.row_mask = None


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None, rows: torch.Tensor | None = None) -> Iterator[nn.Module]:
    """Context manager: run ``model`` with adapter ``name`` (or none), then restore the previous switch state.

    The active adapter, on/off flag and row mask are restored; a merge the switch had to undo
    (switching a merged adapter off) is not redone: call :func:`merge_adapter` again if wanted.
    """
    saved = {n: (m.active, m.enabled, m.row_mask) for n, m in lora_layers(model).items()}
    set_adapter(model, name, rows)
    try:
        yield model
    finally:
        for n, m in lora_layers(model).items():
            if n in saved:
                active, enabled, mask = saved[n]
                if m.merged is not None and (m.merged != active or not enabled):
                    m.unmerge()
                m.active, m.enabled, m.row_mask = active, enabled, mask


def merge_adapter(model: nn.Module, name: str) -> list[str]:
    """Merge adapter ``name`` into every layer that has it (idempotent); returns their names."""
    layers = _layers_with(model, name)
    for layer in layers.values():
        layer.merge(name)
    for layer in lora_layers(model).values():
        if name not in layer.specs:
            layer.set_active(None)
    return list(layers)


def unmerge_adapter(model: nn.Module) -> None:
    """Restore the original weights of every merged layer (bit-exact)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def train_only(model: nn.Module, keep: list[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except those in ``keep`` (by identity); return ``keep``."""
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return keep


def mark_only_adapter_trainable(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except adapter ``name``'s A and B; return those."""
    layers = _layers_with(model, name)
    return train_only(model, [p for layer in layers.values() for p in (layer.lora_A[name], layer.lora_B[name])])


def remove_adapters(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by a plain nn.Linear with the original weights; return the names."""
    names = list(lora_layers(model))
    for n in names:
        _set_submodule(model, n, model.get_submodule(n).unwrap())
    return names


# ------------------------------------------------------------------------- state dicts
def _is_lora_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B")


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without adapter tensors: equal to the un-injected model's state dict."""
    return {k: v for k, v in model.state_dict().items() if not _is_lora_key(k)}


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors keyed ``<module>.lora_A`` / ``<module>.lora_B``."""
    out: dict[str, torch.Tensor] = {}
    for mname, layer in _layers_with(model, name).items():
        out[f"{mname}.lora_A"] = layer.lora_A[name].detach()
        out[f"{mname}.lora_B"] = layer.lora_B[name].detach()
    return out


def save_adapter(model: nn.Module, folder: str | Path, name: str, *, meta: dict | None = None) -> Path:
    """Write adapter ``name`` as a component folder: config.json + model.safetensors.

    config: ``{"name", "modules": {module: {"rank", "alpha", "dropout", "in", "out"}}}``.
    """
    layers = _layers_with(model, name)
    config = {
        "name": name,
        "modules": {
            m: {**vars(layer.specs[name]), "in": layer.in_features, "out": layer.out_features}
            for m, layer in layers.items()
        },
    }
    return save_component(folder, ADAPTER_KIND, config, adapter_state_dict(model, name), meta=meta)


def load_adapter(model: nn.Module, folder: str | Path, *, name: str | None = None) -> str:
    """Load an adapter folder into ``model`` (injecting it where needed); return its name.

    Every module the adapter names must exist in ``model`` as a linear layer with the saved
    in/out sizes, and every tensor must have the expected shape; otherwise CheckpointError
    names the folder and each mismatch. ``name`` renames the adapter on load.
    """
    comp = load_component(folder, ADAPTER_KIND)
    cfg = comp.config
    saved_name = cfg.get("name")
    modules_cfg = cfg.get("modules")
    if not isinstance(saved_name, str) or not isinstance(modules_cfg, dict) or not modules_cfg:
        raise CheckpointError(f"{comp.folder / 'config.json'}: adapter config needs 'name' and a non-empty 'modules'")
    name = name or saved_name
    present = dict(model.named_modules())
    problems: list[str] = []
    for m, mc in modules_cfg.items():
        mod = present.get(m)
        if mod is None:
            problems.append(f"module '{m}' not in model")
        elif not isinstance(mod, (*LINEAR_TYPES, LoRALinear)):
            problems.append(f"module '{m}' is a {type(mod).__name__}, not a linear layer")
        elif (mod.in_features, mod.out_features) != (mc.get("in"), mc.get("out")):
            problems.append(f"module '{m}': adapter is for ({mc.get('in')} -> {mc.get('out')}), "
                            f"model has ({mod.in_features} -> {mod.out_features})")
        elif isinstance(mod, LoRALinear) and name in mod.specs:
            problems.append(f"module '{m}' already has an adapter named '{name}'")
    if problems:
        raise CheckpointError(f"{comp.folder}: adapter does not fit this model: " + "; ".join(problems))
    tensors = comp.tensors()
    expected = {}
    for m, mc in modules_cfg.items():
        expected[f"{m}.lora_A"] = (int(mc["rank"]), int(mc["in"]))
        expected[f"{m}.lora_B"] = (int(mc["out"]), int(mc["rank"]))
    bad = sorted(set(expected) ^ set(tensors))
    bad_shapes = [f"{k}: {tuple(tensors[k].shape)} vs {v}" for k, v in expected.items()
                  if k in tensors and tuple(tensors[k].shape) != v]
    if bad or bad_shapes:
        raise CheckpointError(f"{comp.weights}: adapter tensors do not match its config: "
                              f"names {bad[:6]} shapes {bad_shapes[:6]}")
    for m, mc in modules_cfg.items():
        layer = _wrap(model, m)
        layer.add_adapter(name, int(mc["rank"]), float(mc["alpha"]), float(mc.get("dropout", 0.0)))
        with torch.no_grad():
            layer.lora_A[name].copy_(tensors[f"{m}.lora_A"])
            layer.lora_B[name].copy_(tensors[f"{m}.lora_B"])
    return name
