"""Serve a trained IMoE system (``taskmoe.load(path)``): the routing key is the selected experts.

The system's router decides, once per prompt and before batching, which category experts run
(:meth:`Router.route_batch`); the key is that expert tuple, so a batch holds prompts that draft
with the same experts, each expert decoding once per step for the whole batch, then one
summarizer (or ensemble) decode for all rows.

Continuous batching (:meth:`SystemBackend.open_batch` -> :class:`SystemBatch`): the scheduler
drives the system's :class:`~taskmoe.inference.stages.session.PipelineSession` one decode step
at a time; rows of a request that arrives later (a new *cohort*) are routed in one batched pass
and join the running draft decodes between steps, then the running summarizer (or ensemble)
decode after their one-pass cross-talk/assessment. So a long IMoE request no longer blocks the
requests that arrive after it, and a row's answer equals its solo :meth:`System.generate` run
(tested). :meth:`SystemBackend.generate_batch` still answers a batch in ONE pipeline call. The routing decision is the route trace;
the system's full per-prompt :class:`~taskmoe.inference.trace.Trace` (experts loaded or cached,
drafts, disagreement, adapter, stop reason, timings) is the row's generation trace.

Mapping the OpenAI API onto a single-prompt system, through the pipeline's per-row hooks:

- a completions ``prompt`` is the prompt; a chat is its system messages and its one user message,
  joined by blank lines (the system answers single prompts: assistant turns are refused, 400);
- every row's sampling settings are its own ``options`` (``max_new_tokens``, ``temperature``,
  ``top_p``, ``seed``: an unseeded sampled row gets a fresh seed, reported in its trace); the
  pipeline decodes each row with its own generator, so rows with different seeds share ONE call;
- **streaming**: the pipeline's ``on_token`` hands every answer token (``stage == "answer"``, or the
  tokens of a clarification question) to the row's ``emit`` as it is produced; drafts and
  cross-talk turns are not answer text and are not streamed (they are in the trace);
- **stopping**: each row's :class:`~taskmoe.inference.stages.Control` asks the serving row whether
  it is still alive (client there, deadline not passed), and ``emit`` returning False (a stop
  sequence matched) cancels it, so a row nobody waits for leaves every stage within one decode
  step; ``max_tokens`` cuts a clarification like any answer.

Health: experts load lazily, so :meth:`SystemBackend.check_components` reads every expert once
at start (header, names and shapes against the model they rebuild, every tensor's bytes) and
evicts what it loaded; the summarizer and its adapters were loaded by ``taskmoe.load`` already.
An expert that fails later raises :class:`~taskmoe.serving.backend.ComponentUnavailable` naming it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from taskmoe.errors import CheckpointError, RequestError
from taskmoe.inference.stages import Control
from taskmoe.serving.backend import ComponentUnavailable, Route, Row, RowResult
from taskmoe.serving.backends.decode import MIN_TEMPERATURE, row_seed

T = TypeVar("T")


class SystemBackend:
    """An IMoE :class:`~taskmoe.inference.pipeline.System` served under one model id."""

    def __init__(self, system: Any, name: str = "taskmoe") -> None:
        self.system = system
        self.tokenizer = system.tokenizer
        self.name = name

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None, weights: str = "fp32") -> "SystemBackend":
        from taskmoe.inference.loader import load_system

        return cls(load_system(path, weights=weights), name or Path(path).resolve().name)

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

    def guarded(self, route: Route, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``; a failure that an expert of ``route`` explains becomes :class:`ComponentUnavailable`."""
        try:
            return fn(*args)
        except RequestError:
            raise
        except Exception as e:
            failed = self._failed_component(route)
            if failed is not None:
                raise failed from e
            raise

    def generate_batch(self, route: Route, rows: Sequence[Row]) -> list[RowResult]:
        """Every row of one batch in ONE pipeline call (:meth:`System.generate_ids`)."""
        return self.guarded(route, self._generate, rows)

    def _generate(self, rows: Sequence[Row]) -> list[RowResult]:
        cohort = Cohort(rows)
        answers = self.system.generate_ids([r.prompt_ids for r in rows], **cohort.call_args())
        return [cohort.result(i, trace) for i, (_ids, trace) in enumerate(answers)]

    def open_batch(self, route: Route) -> "SystemBatch":
        """A continuous batch for ``route``'s rows: the pipeline's decodes, rows joining between steps."""
        return SystemBatch(self, route)


class Cohort:
    """Serving rows that enter the pipeline together (one call): their per-row options, controls and
    answer-token bookkeeping (see the module docstring)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = list(rows)
        self.seeds = [row_seed(r) for r in rows]
        self.options = [{"max_new_tokens": r.params.max_tokens, "seed": s, "top_p": r.params.top_p,
                         "temperature": 0.0 if r.params.temperature < MIN_TEMPERATURE else r.params.temperature}
                        for r, s in zip(rows, self.seeds)]
        self.controls = [Control(is_cancelled=lambda r=r: not r.alive()) for r in rows]
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.finish: list[str | None] = [None] * len(rows)  # "halted" (emit said stop) or "length", once decided

    def call_args(self) -> dict[str, Any]:
        return {"controls": self.controls, "on_token": self.on_token, "options": self.options}

    def on_token(self, i: int, token: int, stage: str, _expert: str | None) -> None:
        if stage not in ("answer", "clarification") or self.finish[i] is not None:
            return
        row = self.rows[i]
        self.tokens[i].append(int(token))
        if not row.emit(int(token)):
            self.finish[i] = "halted"  # a stop sequence matched, the client went away or the deadline passed
        elif len(self.tokens[i]) >= row.params.max_tokens:
            self.finish[i] = "length"  # (cuts a clarification, which is written at once)
        if self.finish[i] == "halted":
            self.controls[i].cancel()  # the row leaves the batch before the next decode step

    def result(self, i: int, trace: Any) -> RowResult:
        end = self.finish[i] or ("halted" if trace.stopped is not None else "eos")
        return RowResult(self.tokens[i], end,  # type: ignore[arg-type]
                         {**trace.to_dict(), "seed": self.seeds[i], "batch_rows": len(self.rows)})


class SystemBatch:
    """The :class:`~taskmoe.serving.backend.StepBatch` of an IMoE route: a
    :class:`~taskmoe.inference.stages.session.PipelineSession` whose rows come in cohorts (one per
    ``add``); ``step`` is one decode step of every decode stage. Failures map as in
    :meth:`SystemBackend.generate_batch`."""

    def __init__(self, backend: SystemBackend, route: Route) -> None:
        self.backend, self.route = backend, route
        self.system = backend.system
        self.session = self.system.open_session()
        self._handles = itertools.count()
        self._of: dict[int, tuple[int, Cohort]] = {}  # id(stage row) -> (handle, cohort)
        self._rows: dict[int, Any] = {}  # handle -> stage row

    def __len__(self) -> int:
        return len(self.session)

    def add(self, rows: Sequence[Row]) -> list[int]:
        cohort = Cohort(rows)
        stage_rows, call = self.system.call_rows([r.prompt_ids for r in rows], **cohort.call_args())
        handles = [next(self._handles) for _ in rows]
        for h, r in zip(handles, stage_rows):
            self._of[id(r)], self._rows[h] = (h, cohort), r
        self.backend.guarded(self.route, self.session.add, stage_rows, call)
        return handles

    def step(self) -> list[tuple[int, RowResult]]:
        return self._results(self.backend.guarded(self.route, self.session.step))

    def drop(self, handles: Sequence[int]) -> list[tuple[int, RowResult]]:
        return self._results(self.session.drop([self._rows[h] for h in handles if h in self._rows]))

    def _results(self, done: list[tuple[Any, Any]]) -> list[tuple[int, RowResult]]:
        out = []
        for r, call in done:
            h, cohort = self._of.pop(id(r))
            del self._rows[h]
            ((_ids, trace),) = self.system.results([r], call)
            out.append((h, cohort.result(r.index, trace)))
        return out
