"""Serve a trained IMoE system (``taskmoe.load(path)``): the routing key is the selected experts.

The system's router decides, once per prompt and before batching, which category experts run
(:meth:`Router.route_batch`); the key is that expert tuple, so a batch holds prompts that draft
with the same experts and :meth:`System.generate_ids` runs each of them once for the whole batch,
then one summarizer (or ensemble) decode for all rows. The routing decision is the route trace;
the system's full per-prompt :class:`~taskmoe.inference.trace.Trace` (experts loaded or cached,
drafts, disagreement, adapter, timings) is the row's generation trace.

Mapping the OpenAI API onto a single-prompt system:

- a completions ``prompt`` is the prompt; a chat is its system messages and its one user message,
  joined by blank lines (the system answers single prompts: assistant turns are refused, 400);
- sampling settings come per request, but one :meth:`System.generate_ids` call shares them, so rows
  of a batch are split by (temperature, top_p, seed) and run with the largest ``max_tokens`` of
  their group, each row then cut to its own (greedy decoding makes that exact);
- the system decodes inside one call, so tokens are handed to the server (``emit``) when the call
  returns: streaming works but arrives at once; a stop sequence cuts the answer afterwards;
- a clarification (the drafts disagreed) is the answer text, returned like generated text;
- a group whose rows all died (client gone, deadline passed) before it starts is skipped.

Health: experts load lazily, so :meth:`SystemBackend.check_components` reads every expert once
at start (header, names and shapes against the model they rebuild, every tensor's bytes) and
evicts what it loaded; the summarizer and its adapters were loaded by ``taskmoe.load`` already.
An expert that fails later raises :class:`~taskmoe.serving.backend.ComponentUnavailable` naming it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from taskmoe.errors import CheckpointError, RequestError
from taskmoe.serving.backend import ComponentUnavailable, Route, Row, RowResult
from taskmoe.serving.backends.decode import MIN_TEMPERATURE, row_seed


class SystemBackend:
    """An IMoE :class:`~taskmoe.inference.pipeline.System` served under one model id."""

    def __init__(self, system: Any, name: str = "taskmoe") -> None:
        self.system = system
        self.tokenizer = system.tokenizer
        self.name = name

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None) -> "SystemBackend":
        from taskmoe.inference.loader import load_system

        return cls(load_system(path), name or Path(path).resolve().name)

    def model_ids(self) -> list[str]:
        return [self.name]

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.system.encode(text)
        if not ids:
            raise RequestError("the prompt is empty")
        return ids

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        users = [m for m in messages if m["role"] == "user"]
        if len(users) != 1 or any(m["role"] not in ("system", "user") for m in messages):
            raise RequestError("this IMoE system answers single prompts: send system messages (optional) and "
                               f"exactly one user message, got roles {[m['role'] for m in messages]}")
        return self.encode_prompt("\n\n".join(m["content"] for m in messages if m["content"]))

    def route(self, model_id: str, prompt_ids: Sequence[int]) -> Route:
        d = self.system.router.route_batch([list(prompt_ids)])[0]
        experts = tuple(self.system.expert_of[c] for c in d.selected_names)
        return Route(key=experts, trace={**d.to_dict(), "experts": list(experts)})

    def components(self, route: Route) -> list[str]:
        return [f"expert {e}" for e in route.key]

    def check_components(self) -> list[str]:
        """Load every expert once (then evict it unless it was resident); raise naming a bad one."""
        store = self.system.store
        checked = []
        for name in store.names:
            resident = store.is_resident(name)
            try:
                store.get(name)
            except Exception as e:  # noqa: BLE001 - any failure to load is a bad component
                raise CheckpointError(f"expert {name!r}: {e}") from e
            if not resident:
                store.evict(name)
            checked.append(f"expert {name}")
        return checked

    def _failed_component(self, route: Route) -> ComponentUnavailable | None:
        """After a failed call: the first of the route's experts that does not load, if any."""
        for name in route.key:
            try:
                self.system.store.get(name)
            except Exception as e:  # noqa: BLE001
                return ComponentUnavailable(f"expert {name}", f"{type(e).__name__}: {e}")
        return None

    def generate_batch(self, route: Route, rows: Sequence[Row]) -> list[RowResult]:
        try:
            return self._generate(route, rows)
        except RequestError:
            raise
        except Exception as e:
            failed = self._failed_component(route)
            if failed is not None:
                raise failed from e
            raise

    def _generate(self, route: Route, rows: Sequence[Row]) -> list[RowResult]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        seeds = [row_seed(r) for r in rows]
        for i, r in enumerate(rows):
            greedy = r.params.temperature < MIN_TEMPERATURE
            groups[(0.0, 1.0, 0) if greedy else (r.params.temperature, r.params.top_p, seeds[i])].append(i)
        out: list[RowResult | None] = [None] * len(rows)
        for (temperature, top_p, seed), idx in groups.items():
            if not any(rows[i].alive() for i in idx):
                for i in idx:
                    out[i] = RowResult([], "halted", {"seed": seed})
                continue
            answers = self.system.generate_ids(
                [rows[i].prompt_ids for i in idx], max_new_tokens=max(rows[i].params.max_tokens for i in idx),
                temperature=temperature, top_p=top_p, seed=seed)
            for i, (ids, trace) in zip(idx, answers):
                if trace.clarify and trace.clarification:
                    ids = self.tokenizer.encode(trace.clarification, allow_special=False)
                out[i] = self._emit(rows[i], list(ids), {**trace.to_dict(), "seed": seed})
        return out  # type: ignore[return-value]

    @staticmethod
    def _emit(row: Row, ids: list[int], trace: dict[str, Any]) -> RowResult:
        """Hand the finished answer to the server token by token, cut at the row's max_tokens."""
        kept: list[int] = []
        for tok in ids[: row.params.max_tokens]:
            kept.append(tok)
            if not row.emit(tok):
                return RowResult(kept, "halted", trace)
        return RowResult(kept, "length" if len(ids) >= row.params.max_tokens else "eos", trace)
