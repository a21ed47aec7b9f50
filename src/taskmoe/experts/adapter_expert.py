"""Experts that are LoRA adapters of one shared, frozen backbone.

An expert folder of a backbone system is a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, :mod:`taskmoe.models.adapters`); the backbone is loaded once per
process and every expert is a named adapter injected into it.

- :class:`AdapterExpert` is what the expert store hands out: a small ``nn.Module`` whose
  ``forward(ids, state)`` runs the shared backbone with *its* adapter switched on
  (:func:`~taskmoe.layers.lora.use_adapter`) and everything else as the backbone's own. Its
  registered parameters are only the adapter's A and B (the backbone is held outside the
  module tree), so the store charges an expert its adapter bytes, ``state_dict()`` is the
  adapter alone (the training loop checkpoints megabytes, not the backbone), and the optimizer
  sees only A and B.
- :func:`adapter_expert_loader` is the store's loader: load the folder's adapter into the shared
  backbone (once; a second load of the same name reuses it) and wrap it.

Thread safety: a forward and an adapter load hold the backbone's
:func:`~taskmoe.models.switch_lock.switch_lock`, so concurrent passes on one backbone see their own switch.

Design choice: switching adapters per forward (not merging) keeps the base weights bit-exact
and lets several experts share the backbone in one process; the cost is the low-rank update
``s * B (A x)`` on every projection, a few percent of the base matmul at r = 16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from taskmoe.layers.lora import lora_layers, set_adapter, use_adapter
from taskmoe.models.adapters import load_adapter
from taskmoe.models.switch_lock import switch_lock

__all__ = ["AdapterExpert", "adapter_expert_loader", "adapter_parameters"]


def adapter_parameters(base: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """``{module path with '.' -> '_': A or B}`` of adapter ``name`` in ``base`` (the same Parameter objects)."""
    out: dict[str, nn.Parameter] = {}
    for path, layer in lora_layers(base).items():
        if name in layer.specs:
            key = path.replace(".", "_")
            out[f"{key}_A"] = layer.lora_A[name]
            out[f"{key}_B"] = layer.lora_B[name]
    return out


class AdapterExpert(nn.Module):
    """The backbone with adapter ``name`` on: the one LM interface (``forward``/``init_state``)."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        params = adapter_parameters(base, name)
        if not params:
            from taskmoe.errors import ConfigError

            raise ConfigError(f"adapter expert: the backbone has no adapter named {name!r}")
        self._base = (base,)  # not a submodule: shared by every expert, charged to none
        self.adapter = name
        self.lora = nn.ParameterDict(params)

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def vocab_size(self) -> int:
        return int(self.base.vocab_size)  # type: ignore[attr-defined]

    @property
    def config(self) -> Any:
        return self.base.config  # type: ignore[attr-defined]

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> Any:
        return self.base.init_state(batch_size, device, dtype)  # type: ignore[attr-defined]

    def forward(self, input_ids: Tensor, state: Any = None, *, logits_to_keep: int = 0) -> Any:
        with switch_lock(self.base), use_adapter(self.base, self.adapter):
            return self.base(input_ids, state, logits_to_keep=logits_to_keep)


def adapter_expert_loader(base: nn.Module) -> Callable[[Path], nn.Module]:
    """The expert store's loader for PEFT adapter folders on the shared ``base`` (name = folder name)."""

    def load(folder: Path) -> nn.Module:
        folder = Path(folder)
        name = folder.name.split(".aside-")[0]  # an interrupted save's aside copy keeps its expert's name
        with switch_lock(base):
            if not adapter_parameters(base, name):
                load_adapter(base, folder, name=name)
                set_adapter(base, None)  # the shared backbone's own forward stays the base model
        return AdapterExpert(base, name)

    return load
