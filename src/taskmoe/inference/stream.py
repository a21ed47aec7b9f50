"""Iterate a pipeline call's tokens as they are produced: :class:`PipelineStream` over the ``on_token`` callback.

The pipeline reports tokens through a callback (``on_token(row, token, stage, expert)``, see
:mod:`taskmoe.inference.stages.base`), which is what a server's worker thread wants. For Python
users :meth:`System.stream` wraps one call in a :class:`PipelineStream`: the call runs in a
background thread, every token becomes a :class:`TokenEvent` on a queue, and iterating the stream
yields them in order; after the last event ``stream.answers`` holds the call's answers. An error
in the call is raised by the iterator. Leaving early (``close()``, a ``with`` block, or breaking
out of the ``for`` loop) cancels every row's :class:`~taskmoe.inference.stages.Control`, so the
pipeline stops within one decode step, and waits for the thread; ``answers`` then holds what
each row produced, its trace saying it was cancelled.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

__all__ = ["TokenEvent", "PipelineStream"]

_END = object()


@dataclass(frozen=True)
class TokenEvent:
    """One produced token: prompt ``row``, ``token`` id, ``stage`` (draft | crosstalk | answer |
    clarification) and the ``expert`` that wrote it (None for the answer and the clarification)."""

    row: int
    token: int
    stage: str
    expert: str | None = None


class PipelineStream:
    """Run ``call(on_token) -> answers`` in a thread and iterate its :class:`TokenEvent` s."""

    def __init__(self, call: Callable[[Callable[[int, int, str, "str | None"], None]], list[Any]],
                 controls: Sequence[Any]) -> None:
        self.controls = list(controls)
        self.answers: list[Any] | None = None
        self._q: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None

        def on_token(row: int, token: int, stage: str, expert: str | None) -> None:
            self._q.put(TokenEvent(row, token, stage, expert))

        def work() -> None:
            try:
                self.answers = call(on_token)
            except BaseException as e:  # noqa: BLE001 - handed to the reading thread
                self._error = e
            finally:
                self._q.put(_END)

        self._thread = threading.Thread(target=work, name="taskmoe-stream", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[TokenEvent]:
        done = False
        try:
            while True:
                ev = self._q.get()
                if ev is _END:
                    done = True
                    self._thread.join()
                    if self._error is not None:
                        raise self._error
                    return
                yield ev
        finally:
            if not done:  # the reader left early (break, close, garbage collection): stop the work
                self.close()

    def close(self) -> None:
        """Cancel every row and wait for the call to end (what it produced stays in ``answers``)."""
        for c in self.controls:
            c.cancel()
        self._thread.join()

    def __enter__(self) -> "PipelineStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
