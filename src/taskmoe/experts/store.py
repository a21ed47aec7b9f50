"""ExpertStore: experts on disk, loaded lazily on first use, evicted least-recently-used.

One component folder per expert (``experts/<name>/config.json + model.safetensors``). Nothing
is read until :meth:`ExpertStore.get` asks for an expert; a budget (a number of experts and/or
bytes of parameters) bounds what stays resident, and the least recently used expert is evicted
first. A system with 16 registered experts that uses 2 holds 2 in memory.

Design choices:

- **The loader is injected** (``loader(folder) -> nn.Module``), so the store knows nothing of
  model classes; the pipeline passes one that rebuilds an expert around the shared embedding.
- **Thread-safe**: one lock guards the LRU table; loads of *different* experts may proceed in
  parallel, while concurrent requests for the *same* expert wait for one load (per-name lock).
- **Counted**: loads, hits, evictions and total load seconds (:class:`StoreStats`), so serving
  and benchmarks can see what laziness costs.
- An expert in use when evicted stays alive for its caller (Python references), it is only
  dropped from the store; a pinned expert (``pin``) is never evicted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from taskmoe.errors import CheckpointError, ConfigError

Loader = Callable[[Path], nn.Module]


def module_nbytes(module: nn.Module, exclude_ptrs: Iterable[int] = ()) -> int:
    """Bytes held by a module's parameters and buffers (each storage counted once), leaving out
    the storages whose data pointers are in ``exclude_ptrs`` (tensors shared with others)."""
    seen: set[int] = set(exclude_ptrs)
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


@dataclass
class StoreStats:
    loads: int = 0
    hits: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    resident: list[str] = field(default_factory=list)
    resident_bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "loads": self.loads,
            "hits": self.hits,
            "evictions": self.evictions,
            "load_seconds": round(self.load_seconds, 4),
            "resident": list(self.resident),
            "resident_bytes": self.resident_bytes,
        }


class ExpertStore:
    """Lazy, LRU-bounded access to expert models by name."""

    def __init__(
        self,
        loader: Loader,
        *,
        max_experts: int | None = None,
        max_bytes: int | None = None,
        exclude_shared: Iterable[torch.Tensor] = (),
    ) -> None:
        if max_experts is not None and max_experts < 1:
            raise ConfigError(f"max_experts must be >= 1 or None, got {max_experts}")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self._loader = loader
        self.max_experts = max_experts
        self.max_bytes = max_bytes
        self._folders: dict[str, Path] = {}
        self._resident: OrderedDict[str, tuple[nn.Module, int]] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        # tensors shared by every expert (the embedding table) are not charged to any expert
        self._shared_ptrs = {t.untyped_storage().data_ptr() for t in exclude_shared}
        self._stats = StoreStats()

    # ------------------------------------------------------------------ registration
    def register(self, name: str, folder: str | Path) -> None:
        folder = Path(folder)
        if not name:
            raise ConfigError("expert name must be non-empty")
        with self._lock:
            self._folders[name] = folder
            self._name_locks.setdefault(name, threading.Lock())

    def register_dir(self, root: str | Path) -> list[str]:
        """Register every sub-folder of ``root`` that holds a config.json; returns the names."""
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"{root}: experts folder not found")
        names = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        for n in names:
            self.register(n, root / n)
        return names

    def unregister(self, name: str) -> None:
        with self._lock:
            self._folders.pop(name, None)
            self._resident.pop(name, None)
            self._pinned.discard(name)

    @property
    def names(self) -> list[str]:
        return list(self._folders)

    def folder(self, name: str) -> Path:
        """The folder expert ``name`` is (or will be) loaded from."""
        return self._folders[name]

    def __contains__(self, name: str) -> bool:
        return name in self._folders

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    # ------------------------------------------------------------------------ access
    def get(self, name: str) -> nn.Module:
        """The expert ``name``, loading it on first use and marking it most recently used."""
        with self._lock:
            if name not in self._folders:
                raise KeyError(f"unknown expert {name!r}; registered: {sorted(self._folders)}")
            if name in self._resident:
                self._resident.move_to_end(name)
                self._stats.hits += 1
                return self._resident[name][0]
            name_lock = self._name_locks[name]
            folder = self._folders[name]
        with name_lock:
            with self._lock:  # another thread may have loaded it while we waited
                if name in self._resident:
                    self._resident.move_to_end(name)
                    self._stats.hits += 1
                    return self._resident[name][0]
            t0 = time.perf_counter()
            model = self._loader(folder)
            model.eval()
            dt = time.perf_counter() - t0
            nbytes = self._charged_bytes(model)
            with self._lock:
                self._stats.loads += 1
                self._stats.load_seconds += dt
                self._resident[name] = (model, nbytes)
                self._evict_over_budget(keep=name)
            return model

    def pin(self, name: str) -> None:
        """Keep ``name`` resident whatever the budget (e.g. an expert every request uses)."""
        self.get(name)
        with self._lock:
            self._pinned.add(name)

    def evict(self, name: str) -> bool:
        with self._lock:
            if name in self._resident:
                del self._resident[name]
                self._pinned.discard(name)
                self._stats.evictions += 1
                return True
            return False

    def stats(self) -> StoreStats:
        with self._lock:
            s = StoreStats(**{k: v for k, v in vars(self._stats).items() if k not in ("resident", "resident_bytes")})
            s.resident = list(self._resident)
            s.resident_bytes = sum(b for _, b in self._resident.values())
            return s

    # ----------------------------------------------------------------------- internals
    def _charged_bytes(self, model: nn.Module) -> int:
        return module_nbytes(model, self._shared_ptrs)

    def _over_budget(self) -> bool:
        if self.max_experts is not None and len(self._resident) > self.max_experts:
            return True
        if self.max_bytes is not None and sum(b for _, b in self._resident.values()) > self.max_bytes:
            return True
        return False

    def _evict_over_budget(self, keep: str) -> None:
        # called with self._lock held; oldest first, never the one just loaded nor a pinned one
        for victim in list(self._resident):
            if not self._over_budget():
                break
            if victim == keep or victim in self._pinned:
                continue
            del self._resident[victim]
            self._stats.evictions += 1
