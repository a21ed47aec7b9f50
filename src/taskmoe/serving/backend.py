"""The small protocol the server drives, so HTTP, scheduling and models stay apart.

A backend speaks token ids (the engine never sees HTTP, STYLE.md 11); the server turns text into
ids with the backend's encoders and decodes output incrementally with its tokenizer:

- ``model_ids()``: the names ``/v1/models`` lists and requests must use.
- ``encode_prompt(text)`` / ``encode_chat(messages)``: a completions prompt / a chat's messages as
  the prompt ids the backend's models expect (special-token strings in user text stay plain text).
- ``route(model_id, prompt_ids) -> Route``: decided **once per prompt, before batching**.
  ``Route.key`` is the batching key: which weights the rows will run through (a plain LM: the
  model; an IMoE system: the selected experts; a DOE model: the experts its gates accept).
  ``Route.trace`` is a JSON-safe record of the decision, returned to clients that ask for it.
- ``generate_batch(route, rows) -> list[RowResult]``: generate every row of one batch (all rows
  share ``route.key``, so each expert runs once per step for the whole batch). Runs in a worker
  thread. After each new token of row ``i`` it calls ``rows[i].emit(token_id)``; ``emit`` returning
  False halts that row (a stop sequence matched, the client went away, or the deadline passed).

Optional, for what a backend can do better (the scheduler checks with ``getattr``):

- ``open_batch(route) -> StepBatch``: continuous batching. The scheduler adds rows between steps
  and steps the batch itself, so rows of many requests are in flight, a row that ends or is
  dropped costs nothing more, and no request blocks the others (LM, DOE and IMoE backends).
- ``check_components() -> list[str]``: read every weight file the backend may load later (experts
  load lazily) and raise :class:`~taskmoe.errors.CheckpointError` naming a bad one; returns the
  names of what it checked (``taskmoe serve`` calls it before reporting healthy).
- ``components(route) -> list[str]``: the components a route needs, so a request routed to a
  component that already failed is answered 503 before any work starts.

A component that fails while serving (an expert file corrupted after start) raises
:class:`ComponentUnavailable` naming it; the server answers 503 naming it and lists it in
``/health``.

Design choices: rows are independent units (a request with ``n`` choices is ``n`` rows with the
same route), so a batch mixes rows of different requests freely; per-row sampling settings and
seeds let a row give the same tokens whatever batch it lands in (tested for the LM backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Literal, Mapping, Protocol, Sequence, runtime_checkable

from taskmoe.errors import TaskmoeError

FinishReason = Literal["eos", "length", "halted"]
"""Why a row ended: the model emitted its end token, ``max_tokens`` was reached, or ``emit`` said stop."""


@runtime_checkable
class TokenizerLike(Protocol):
    """The part of :class:`taskmoe.data.tokenizer.Tokenizer` the server uses.

    Prompts are encoded with specials disabled (``encode(text, allow_special=False)``,
    ``encode_chat``) so a client cannot forge a role or end token; output is decoded with
    ``skip_special=True``.
    """

    bos_id: int
    eos_id: int

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...


@dataclass(frozen=True)
class Route:
    """A routing decision: ``key`` groups rows into batches; ``trace`` is returned on request."""

    key: Hashable
    trace: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class SamplingParams:
    """Per-row decoding settings. ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Row:
    """One sequence to generate: its prompt, sampling settings, the per-token callback, and
    ``alive()`` (False once nobody waits for the row: a backend that cannot stop mid-call checks
    it before starting work)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[int], bool] = field(default=lambda _tok: True, repr=False)
    alive: Callable[[], bool] = field(default=lambda: True, repr=False)


@dataclass
class RowResult:
    """What one row produced. ``token_ids`` excludes the prompt and the end token."""

    token_ids: list[int]
    finish: FinishReason
    trace: Mapping[str, Any] | None = None


class ComponentUnavailable(TaskmoeError):
    """A served component (``"expert code"``, ``"model m"``) failed to load or run (answer 503)."""

    def __init__(self, component: str, reason: str) -> None:
        super().__init__(f"{component} is unavailable: {reason}")
        self.component, self.reason = component, reason


class StepBatch(Protocol):
    """A running batch the scheduler drives step by step (see :class:`~taskmoe.serving.backends.decode.RowBatch`)."""

    def __len__(self) -> int: ...

    def add(self, rows: Sequence[Row]) -> list[int]: ...

    def drop(self, handles: Sequence[int]) -> list[tuple[int, RowResult]]: ...

    def step(self) -> list[tuple[int, RowResult]]: ...


@runtime_checkable
class Backend(Protocol):
    """What :func:`taskmoe.serving.app.create_app` and :class:`~taskmoe.serving.scheduler.Scheduler` need."""

    tokenizer: TokenizerLike

    def model_ids(self) -> list[str]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...

    def route(self, model_id: str, prompt_ids: Sequence[int]) -> Route: ...

    def generate_batch(self, route: Route, rows: Sequence[Row]) -> list[RowResult]: ...
