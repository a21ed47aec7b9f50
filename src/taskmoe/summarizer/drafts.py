"""Expert drafts for the summarizer: route a batch of prompts, let each selected expert draft, cache.

:class:`Drafter` routes every prompt once, groups the prompts by selected expert (each expert is
fetched from the :class:`~taskmoe.experts.store.ExpertStore` once per group, so lazy loading
and LRU eviction see one load per expert, not one per prompt), generates in batches, and
returns per prompt the :class:`~taskmoe.summarizer.fuser.Draft` list with the router's
confidences. Generation is injected (``generate(model, prompts, max_new_tokens) -> new ids``,
greedy, without the prompt and without the final ``<|eos|>``) so this layer does not depend on
the inference engine, which sits above it.

:class:`DraftCache` keeps drafts on disk as JSONL, one ``{"key", "expert", "ids"}`` line per
draft, appended and fsync-ed per batch (a crash loses at most the batch in flight; a torn last
line is skipped on load). The key hashes everything a draft depends on: the expert's prompt
ids, the expert name, a fingerprint of the expert's weights (:func:`folder_fingerprint`) and
the generation settings, so retraining an expert or changing the draft length never serves a
stale draft.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from torch import nn

from taskmoe.progress import progress_bar
from taskmoe.errors import ConfigError
from taskmoe.summarizer.fuser import Draft

if TYPE_CHECKING:  # pragma: no cover
    from taskmoe.experts.store import ExpertStore
    from taskmoe.router.policy import RoutingDecision
    from taskmoe.router.router import Router

__all__ = ["GenerateFn", "DraftCache", "DraftSet", "Drafter", "draft_key", "folder_fingerprint"]

GenerateFn = Callable[[nn.Module, list[list[int]], int], list[list[int]]]
"""``generate(model, prompts, max_new_tokens) -> continuations`` (greedy; no prompt, no final eos)."""


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 (16 hex) of a component folder's config.json and model.safetensors bytes."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        p = Path(folder) / name
        if p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def draft_key(prompt: Sequence[int], expert: str, fingerprint: str, settings: Mapping[str, Any]) -> str:
    """Cache key of one draft: hash of (prompt ids, expert, weights fingerprint, generation settings)."""
    blob = json.dumps([list(map(int, prompt)), expert, fingerprint, dict(sorted(settings.items()))], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class DraftCache:
    """Append-only JSONL draft cache, read fully on open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mem: dict[str, list[int]] = {}
        self.hits = self.misses = 0
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        self._mem[str(rec["key"])] = [int(t) for t in rec["ids"]]
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # a torn line from an interrupted write

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, key: str) -> list[int] | None:
        ids = self._mem.get(key)
        if ids is None:
            self.misses += 1
        else:
            self.hits += 1
        return ids

    def peek(self, key: str) -> list[int] | None:
        """Like :meth:`get` without counting a hit or miss."""
        return self._mem.get(key)

    def put_many(self, records: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        """Store ``(key, expert, ids)`` records: append them and fsync."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, expert, ids in records:
                f.write(json.dumps({"key": key, "expert": expert, "ids": [int(t) for t in ids]}) + "\n")
                self._mem[key] = [int(t) for t in ids]
            f.flush()
            os.fsync(f.fileno())


@dataclass
class DraftSet:
    """The routing decision for one prompt and its drafts (most confident first)."""

    decision: "RoutingDecision"
    drafts: list[Draft]


class Drafter:
    """Route prompts, run the selected experts grouped by expert, return drafts (cached)."""

    def __init__(
        self,
        router: "Router",
        store: "ExpertStore",
        generate: GenerateFn,
        *,
        bos_id: int,
        max_new_tokens: int = 48,
        batch_size: int = 16,
        cache: DraftCache | None = None,
        fingerprints: Mapping[str, str] | None = None,
        expert_of: Mapping[str, str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise ConfigError(f"Drafter: max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        self.router, self.store, self.generate = router, store, generate
        self.bos_id, self.max_new_tokens, self.batch_size = int(bos_id), max_new_tokens, batch_size
        self.cache = cache
        self.fingerprints = dict(fingerprints or {})
        self.expert_of = dict(expert_of or {})
        self.settings = {"max_new_tokens": max_new_tokens, **dict(settings or {})}

    def expert_name(self, category: str) -> str:
        name = self.expert_of.get(category, category)
        if name not in self.store:
            raise ConfigError(f"router category '{category}' maps to expert '{name}', which is not in the expert store "
                              f"(registered: {sorted(self.store.names)})")
        return name

    def draft(self, prompts: Sequence[Sequence[int]], *, progress: bool = True) -> list[DraftSet]:
        """Drafts for each prompt from the experts its routing decision selects."""
        prompts = [[int(t) for t in p] for p in prompts]
        decisions = self.router.route_batch(prompts)
        inputs = [[self.bos_id, *p] for p in prompts]
        wanted: dict[tuple[int, str], str] = {}  # (prompt index, expert) -> cache key
        todo: dict[str, list[int]] = {}
        for i, d in enumerate(decisions):
            for c in d.selected_names:
                e = self.expert_name(c)
                key = draft_key(inputs[i], e, self.fingerprints.get(e, ""), self.settings)
                wanted[(i, e)] = key
                if (self.cache is None or self.cache.get(key) is None) and i not in todo.get(e, []):
                    todo.setdefault(e, []).append(i)
        fresh: dict[str, list[int]] = {}
        total = sum(len(v) for v in todo.values())
        with progress_bar(progress and total > 0) as bar:
            task = bar.add_task("expert drafts", total=total)
            for e in sorted(todo):
                model = self.store.get(e)
                idx = todo[e]
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s : s + self.batch_size]
                    outs = self.generate(model, [inputs[i] for i in chunk], self.max_new_tokens)
                    if len(outs) != len(chunk):
                        raise ConfigError(f"generate returned {len(outs)} drafts for {len(chunk)} prompts")
                    recs = [(wanted[(i, e)], e, list(o)) for i, o in zip(chunk, outs)]
                    for k, _, o in recs:
                        fresh[k] = o
                    if self.cache is not None:
                        self.cache.put_many(recs)
                    bar.advance(task, len(chunk))
        out = []
        for i, d in enumerate(decisions):
            drafts = []
            for ci, c in zip(d.selected, d.selected_names):
                e = self.expert_name(c)
                key = wanted[(i, e)]
                ids = fresh.get(key)
                if ids is None and self.cache is not None:
                    ids = self.cache.peek(key)
                assert ids is not None
                drafts.append(Draft(e, float(min(max(d.confidences[ci], 0.0), 1.0)), tuple(ids)))
            out.append(DraftSet(d, drafts))
        return out
