"""LoRA adapters for our plain ``nn.Module`` models: inject, switch per call, merge, save, load.

A LoRA adapter adds a low-rank update to a frozen linear layer::

    y = x W^T + b + s * dropout(x) A^T B^T,      s = alpha / r

with ``A`` (r x in, Kaiming-uniform init) and ``B`` (out x r, zero init), so a fresh adapter
leaves the model's outputs unchanged.

Why our own ``LoRALinear`` rather than ``peft``: peft's ``LoraModel`` is built around HF-style
models and its own config/save machinery (``adapter_config.json``, ``PeftModel`` wrappers,
``disable_adapter`` on the wrapper), while our models are plain ``nn.Module``\\ s with explicit
decode state; we need adapters stored as *our* component folders (safetensors + JSON through
:mod:`taskmoe.io`), a per-call switch on one shared base model (the summarizer runs with the
coding adapter only on coding intent), an exact row mask for mixed batches, and peft is only an
optional extra, not a core dependency. The whole mechanism is ~one small class.

Design choices:

- **Same state-dict keys as the plain model.** ``LoRALinear`` registers the wrapped layer's own
  ``weight``/``bias`` Parameters (the same objects, so weight tying survives) under the same
  names, plus ``lora_A.<adapter>`` / ``lora_B.<adapter>``, and calls the wrapped layer's own
  forward for the base path (so a subclass of ``nn.Linear`` keeps its own behaviour). Stripping the ``lora_`` keys
  (:func:`base_state_dict`) gives exactly the state dict of the un-injected model.
- **Several named adapters per layer**; at most one is active (``layer.active``), and
  ``layer.enabled`` switches it on/off without touching weights.
- **Target matching**: a pattern matches a module name if the regex fully matches the name or
  any dotted suffix of it (``"in_proj"`` matches ``blocks.3.mixer.in_proj``;
  ``r"blocks\\.[01]\\..*proj"`` matches by full name). Only ``nn.Linear`` modules are
  wrapped. A pattern that wraps nothing is an error naming the pattern (and what it did match).
- **Merge is idempotent and unmerge is bit-exact**: ``merge()`` keeps a copy of the original
  weight and ``unmerge()`` copies it back (no ``W - s B A`` round-off), at the cost of one
  extra copy of each wrapped weight while merged. Merging an already merged layer is a no-op;
  a different adapter is unmerged first. While merged, ``state_dict()`` still reports the
  original (unmerged) weight, so saving a merged model never bakes the adapter in. Switching
  the adapter off or to another one unmerges first. A weight shared with another module (a
  tied head) is never merged, because that would change the other module too.
- **Mixed batches are exact**: :func:`use_adapter` accepts a boolean row mask; rows outside it
  get ``base(x) + 0``, which equals the base output bit for bit.

Glossary: r = rank, alpha = scaling numerator, s = alpha / r, A = down projection (r, in),
B = up projection (out, r).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import load_component, save_component

__all__ = [
    "LoRALinear",
    "AdapterSpec",
    "inject",
    "adapter_names",
    "adapter_state_dict",
    "base_state_dict",
    "lora_layers",
    "mark_only_adapter_trainable",
    "set_adapter",
    "use_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "save_adapter",
    "load_adapter",
    "remove_adapters",
]

ADAPTER_KIND = "lora_adapter"


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one named adapter on one layer."""

    rank: int
    alpha: float
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A linear layer with frozen base weights and any number of named low-rank adapters.

    Build from an existing ``nn.Linear``: the base ``weight``/``bias`` Parameters are reused
    (not copied) and frozen. Use :meth:`add_adapter` to attach adapters; ``active`` names the
    adapter applied when ``enabled`` is true.
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._base = (base,)  # not registered: its Parameters are registered here, under the same names
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active: str | None = None
        self.enabled: bool = True
        self.row_mask: torch.Tensor | None = None  # (B,) bool, set by use_adapter(rows=...)
        self.rows = None  # a taskmoe.layers.multi_lora.RowAdapters: one adapter per row (overrides active)
        self.merged: str | None = None
        self.weight_shared: bool = False  # set by inject when the weight is tied elsewhere
        self._original: torch.Tensor | None = None
        self.train(base.training)  # a wrapped eval-mode model stays in eval mode (dropout off)

    # -- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Attach adapter ``name``: A ~ Kaiming-uniform (r, in), B = 0 (out, r)."""
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if name in self.specs:
            raise ConfigError(f"adapter '{name}' already exists on this layer")
        dev, dt = self.weight.device, self.weight.dtype
        a = torch.empty(rank, self.in_features, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # same init as nn.Linear's weight
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        self.specs[name] = AdapterSpec(rank=rank, alpha=float(alpha), dropout=float(dropout))
        if self.active is None:
            self.active = name

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A, shape (out, in)."""
        return self.specs[name].scale * (self.lora_B[name] @ self.lora_A[name])

    def set_active(self, name: str | None) -> None:
        """Activate adapter ``name`` (None switches adapters off); unmerges a different merge."""
        if name is not None and name not in self.specs:
            raise ConfigError(f"adapter '{name}' not on this layer (has {sorted(self.specs)})")
        if self.merged is not None and self.merged != name:
            self.unmerge()
        if name is None:
            self.enabled = False
        else:
            self.active, self.enabled = name, True

    # -- merge ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the active one) into the weight. Idempotent."""
        name = name or self.active
        if name is None or name not in self.specs:
            raise ConfigError(f"cannot merge adapter {name!r}: layer has {sorted(self.specs)}")
        if self.merged == name:
            return
        if self.weight_shared:
            raise ConfigError("refusing to merge a LoRA adapter into a weight shared with another module (tied weights)")
        if self.merged is not None:
            self.unmerge()
        self._original = self.weight.detach().clone()
        self.weight.add_(self.delta_weight(name).to(self.weight.dtype))
        self.merged, self.active, self.enabled = name, name, True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight. A no-op when nothing is merged."""
        if self.merged is None:
            return
        assert self._original is not None
        self.weight.copy_(self._original)
        self._original, self.merged = None, None

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base[0](x)  # the wrapped layer's own forward (keeps e.g. taskmoe Linear's decode path)
        if self.rows is not None:  # per-row adapters (taskmoe.layers.multi_lora): the base once + segments
            return y + self.rows.delta(self, x)
        if self.merged is not None:
            if self.row_mask is not None:
                raise ConfigError("a row mask cannot be used while the adapter is merged; unmerge first")
            return y
        if not self.enabled or self.active is None:
            return y
        spec = self.specs[self.active]
        h = F.dropout(x, spec.dropout, self.training) if spec.dropout > 0 else x
        delta = F.linear(F.linear(h, self.lora_A[self.active]), self.lora_B[self.active]) * spec.scale
        if self.row_mask is not None:
            m = self.row_mask.to(delta.dtype)
            if m.shape[0] != x.shape[0]:
                raise ConfigError(f"adapter row mask has {m.shape[0]} rows but the input batch has {x.shape[0]}")
            delta = delta * m.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)
        return y + delta

    # -- state dict: report the unmerged base weight ---------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._original is not None:
            destination[prefix + "weight"] = self._original if keep_vars else self._original.detach()

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.unmerge()
        super()._load_from_state_dict(*args, **kwargs)

    def unwrap(self) -> nn.Linear:
        """The wrapped linear layer itself, with its original (unmerged) weights."""
        self.unmerge()
        base = self._base[0]
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        ad = ", ".join(f"{n}(r={s.rank}, alpha={s.alpha:g})" for n, s in self.specs.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ad}], active={self.active}, " \
               f"enabled={self.enabled}, merged={self.merged}"


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
                (hits if isinstance(mod, (nn.Linear, LoRALinear)) else other)[t].append(name)
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
    owners = sum(1 for m in model.modules() for p in m.parameters(recurse=False) if p is mod.weight)
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


def mark_only_adapter_trainable(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except adapter ``name``'s A and B; return those."""
    layers = _layers_with(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer in layers.values():
        for p in (layer.lora_A[name], layer.lora_B[name]):
            p.requires_grad_(True)
            params.append(p)
    return params


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
        elif not isinstance(mod, (nn.Linear, LoRALinear)):
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
