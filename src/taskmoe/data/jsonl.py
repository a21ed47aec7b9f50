"""JSON Lines parsing, once for every reader in :mod:`taskmoe.data`.

:func:`json_lines` turns an iterable of text lines (an open file or ``text.splitlines()``) into
``(line_number, record)`` pairs: blank lines are skipped, numbering starts at 1 and counts the
blank lines too, so an error names ``where:N`` as an editor shows it. A line that is not JSON
raises :class:`~taskmoe.errors.DataError` naming the place and the parser's message.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from taskmoe.errors import DataError


def json_lines(lines: Iterable[str], where: str) -> Iterator[tuple[int, Any]]:
    """``(n, json.loads(line))`` for every non-blank line ``n`` (1-based) of ``lines``."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{n}: not valid JSON ({e.msg})") from e
