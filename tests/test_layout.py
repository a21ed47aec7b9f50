"""The layout rule of the code base: no module in ``src/`` over 400 lines, no class over 200.

Small modules with one job are how a newcomer reads the architecture (see
``/work/shared/DESIGN.md``'s layers); this keeps the rule true as code lands. A class is
measured from its first decorator to its last line (``ast``), so docstrings count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "taskmoe"
MAX_FILE_LINES = 400
MAX_CLASS_LINES = 200


def _sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no sources under {SRC}"
    return files


def test_no_module_over_400_lines():
    long = {}
    for p in _sources():
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            long[str(p.relative_to(SRC))] = n
    assert not long, f"modules over {MAX_FILE_LINES} lines (split them by responsibility): {long}"


def test_no_class_over_200_lines():
    long = {}
    for p in _sources():
        tree = ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - first + 1
                if n > MAX_CLASS_LINES:
                    long[f"{p.relative_to(SRC)}::{node.name}"] = n
    assert not long, f"classes over {MAX_CLASS_LINES} lines (move a responsibility out): {long}"
