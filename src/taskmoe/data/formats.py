"""Instruction and preference examples, and readers for the public file formats that hold them.

An :class:`SFTExample` is a chat prompt (a list of ``{"role", "content"}`` messages, ending
with the user's turn) and the assistant response to learn. A :class:`PreferenceExample` is a
prompt with a chosen and a rejected response. Tokenization, templating and truncation happen
later, in :mod:`taskmoe.data.datasets` (one place); readers here only parse and validate.

Readers (each error names the file, the record and the field):

- :func:`read_alpaca`: Alpaca JSON (a list) or JSON Lines of ``{instruction, input, output}``;
  the user turn is the instruction, followed by a blank line and the input when there is one.
- :func:`read_hh_rlhf`: Anthropic HH-RLHF JSONL (optionally ``.gz``), ``{chosen, rejected}``
  dialogues written as ``\\n\\nHuman: ...\\n\\nAssistant: ...``; the shared turns before the
  last assistant turn become the prompt. Pairs whose earlier turns differ (a handful in the
  public files) are skipped with a warning, since they are not one prompt with two answers.
- :func:`read_preferences` picks one of the two preference readers from the first record.
- :func:`read_alpaca_eval`: AlpacaEval annotations ``{instruction, output_1, output_2,
  preference}``; preference 1 or 2 picks the chosen output, anything else (ties: 0 or 1.5,
  missing) is skipped.
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from taskmoe.data.jsonl import json_lines
from taskmoe.errors import DataError


@dataclass(frozen=True)
class SFTExample:
    """A chat prompt (messages, the last one from the user) and the assistant response to learn."""

    messages: list[dict[str, str]] = field(default_factory=list)
    response: str = ""

    @classmethod
    def from_prompt(cls, prompt: str, response: str, system: str | None = None) -> "SFTExample":
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return cls(msgs, response)


    @property
    def conversation(self) -> list[dict[str, str]]:
        """The prompt messages followed by the assistant response."""
        return [*self.messages, {"role": "assistant", "content": self.response}]


@dataclass(frozen=True)
class PreferenceExample:
    """A chat prompt and two assistant responses, the first preferred over the second."""

    messages: list[dict[str, str]]
    chosen: str
    rejected: str


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            yield from json_lines(f, str(path))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _field(rec: Any, name: str, where: str, *, required: bool = True) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if name not in rec:
        if not required:
            return ""
        raise DataError(f"{where}: missing field {name!r} (fields: {sorted(rec)[:12]})")
    v = rec[name]
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(v).__name__}")
    return v


# ---------------------------------------------------------------------------------- alpaca
def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The user turn of an Alpaca record: the instruction, then a blank line and the input if any."""
    instruction, input = instruction.strip(), input.strip()
    return f"{instruction}\n\n{input}" if input else instruction


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` of a JSON list file or a JSON Lines file (``.jsonl``, optionally ``.gz``).

    ``where`` is ``file:line`` (for a JSON list: the line the record starts on, and its index), so
    an error about a malformed record points at it.
    """
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for n, rec in _read_jsonl(path):
            yield f"{path}:{n}", rec
        return
    text = _read_text(path)
    data = _json_list_with_lines(text, path)
    if not data:
        raise DataError(f"{path}: file holds no examples")
    for i, (line, rec) in enumerate(data):
        yield f"{path}:{line} (record {i})", rec


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _json_list_with_lines(text: str, path: Path) -> list[tuple[int, Any]]:
    """Decode a top-level JSON list record by record, keeping each record's starting line."""
    dec = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    pos = ws.match(text, 0).end()  # type: ignore[union-attr]
    if not text.startswith("[", pos):
        try:
            kind = type(json.loads(text)).__name__
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        raise DataError(f"{path}: expected a JSON list of objects, got {kind}")
    pos += 1
    out = []
    while True:
        pos = ws.match(text, pos).end()  # type: ignore[union-attr]
        if text.startswith("]", pos):
            return out
        try:
            rec, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        out.append((text.count("\n", 0, pos) + 1, rec))
        pos = end


def read_alpaca(path: str | Path) -> list[SFTExample]:
    """Alpaca-format JSON list or JSON Lines (``{instruction, input, output}`` records) as SFT examples.

    ``instruction`` and ``output`` are required strings, ``input`` an optional string; a record
    breaking that is a DataError naming the file, line and field.
    """
    path = Path(path)
    out = []
    for where, rec in json_records(path):
        prompt = alpaca_prompt(_field(rec, "instruction", where), _field(rec, "input", where, required=False))
        out.append(SFTExample.from_prompt(prompt, _field(rec, "output", where).strip()))
    if not out:
        raise DataError(f"{path}: file holds no examples")
    return out


# -------------------------------------------------------------------------------- hh-rlhf
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialogue(text: str, where: str = "dialogue") -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", "content": "a"}, {"role": "assistant", ...}]``."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: text before the first 'Human:' turn: {parts[0][:60]!r}")
    if len(parts) < 3:
        raise DataError(f"{where}: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    return [{"role": _HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def read_hh_rlhf(path: str | Path) -> list[PreferenceExample]:
    """HH-RLHF ``{chosen, rejected}`` JSONL(.gz) as preference examples (see module docstring)."""
    path = Path(path)
    out: list[PreferenceExample] = []
    skipped = 0
    for n, rec in _read_jsonl(path):
        where = f"{path}:{n}"
        chosen = parse_hh_dialogue(_field(rec, "chosen", where), f"{where} chosen")
        rejected = parse_hh_dialogue(_field(rec, "rejected", where), f"{where} rejected")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError(f"{where}: a dialogue does not end with an Assistant turn")
        if chosen[:-1] != rejected[:-1] or chosen[-1] == rejected[-1]:
            skipped += 1
            continue
        out.append(PreferenceExample(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]))
    if not out:
        raise DataError(f"{path}: no usable preference pairs")
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} pair(s) whose prompts differ or whose answers are equal", stacklevel=2)
    return out


# ---------------------------------------------------------------------------- alpaca_eval
def read_alpaca_eval(path: str | Path) -> list[PreferenceExample]:
    """AlpacaEval annotations as preference examples; ties and missing preferences are skipped."""
    path = Path(path)
    out = []
    for where, rec in json_records(path):
        instruction = _field(rec, "instruction", where)
        o1, o2 = _field(rec, "output_1", where), _field(rec, "output_2", where)
        pref = rec.get("preference")
        if pref == 1:
            chosen, rejected = o1, o2
        elif pref == 2:
            chosen, rejected = o2, o1
        else:
            continue
        if chosen.strip() == rejected.strip():
            continue
        out.append(PreferenceExample([{"role": "user", "content": instruction.strip()}], chosen.strip(), rejected.strip()))
    if not out:
        raise DataError(f"{path}: no annotation with preference 1 or 2")
    return out


# ------------------------------------------------------------------------------ dispatch
def read_preferences(path: str | Path) -> list[PreferenceExample]:
    """Preference pairs from HH-RLHF (records with ``chosen``) or AlpacaEval (``output_1``) files."""
    path = Path(path)
    first = next(json_records(path), None)
    rec = first[1] if first else None
    if isinstance(rec, dict) and "chosen" in rec:
        return read_hh_rlhf(path)
    if isinstance(rec, dict) and "output_1" in rec:
        return read_alpaca_eval(path)
    raise DataError(f"{path}: not a preference file (records need 'chosen'/'rejected' or 'output_1'/'output_2')")
