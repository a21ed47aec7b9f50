"""Incremental detokenization with stop sequences: token ids in, safe text deltas out.

:class:`TextStream` turns one row's generated token ids into text as they arrive, for SSE
streaming and for stop-sequence detection inside the generation thread (so a row halts on the
token that completes a stop sequence, not at the end).

Design choices:

- **Windowed decoding.** Each step decodes only the ids since the last emitted boundary
  (``_prefix``..end) and compares with the same window without the new ids, so a step costs O(1)
  instead of re-decoding the whole output. A byte-level BPE token can end in the middle of a
  UTF-8 character; while the window's text ends in U+FFFD the ids are held back (at most
  ``MAX_HELD_TOKENS``, so a model emitting invalid bytes still streams).
- **Stop sequences are withheld, never retracted.** Text that could still become the start of a
  stop sequence is not emitted until the next token decides it. When a stop sequence appears the
  text is cut just before it (OpenAI semantics: the stop sequence is not returned).
- The concatenation of every delta equals :attr:`text`, the final answer (tested).
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"
MAX_HELD_TOKENS = 8  # a UTF-8 character spans at most 4 byte tokens; past 8 the bytes are invalid, show them


class TextStream:
    """Accumulate token ids of one row; ``push`` returns the newly safe text."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix = 0  # ids before this index are already decoded into self._full
        self._full = ""  # all text decoded so far (emitted or withheld)
        self._sent = 0  # characters of self._full already returned
        self.stopped = False  # a stop sequence matched; no more text will come

    @property
    def text(self) -> str:
        """The answer so far: everything decoded, cut before a stop sequence if one matched."""
        return self._full

    @property
    def token_count(self) -> int:
        return len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became safe to show (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        window = self._decode(self._ids[self._prefix :])
        if window.endswith(REPLACEMENT) and len(self._ids) - self._prefix < MAX_HELD_TOKENS:
            return ""  # an incomplete multi-byte character: wait for the rest
        before = len(self._full)
        self._full += window
        self._prefix = len(self._ids)
        if self._stop:
            start = max(0, before - self._longest_stop + 1)
            hits = [i for i in (self._full.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self._full = self._full[: min(hits)]
                self.stopped = True
                return self._take(len(self._full))
        return self._take(len(self._full) - self._held_back())

    def finish(self) -> str:
        """No more tokens: release whatever was withheld (it did not become a stop sequence)."""
        if not self.stopped and self._prefix < len(self._ids):
            self._full += self._decode(self._ids[self._prefix :])  # a trailing partial character, as U+FFFD
            self._prefix = len(self._ids)
        return self._take(len(self._full))

    # ------------------------------------------------------------------------------------
    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._full)), best, -1):
                if self._full.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        out = self._full[self._sent : end]
        self._sent = end
        return out
