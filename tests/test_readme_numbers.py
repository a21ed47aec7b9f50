"""Every number the README's "What the numbers say" section quotes stands in docs/benchmarks.md.

A README figure matches when some number in the benchmarks file, rounded to the README's number of
decimals, equals it (the README may round 0.9851 to 0.985, or write 0.9248 as 92.48%). Ranges
("1.05-1.16x") check both ends.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?%?)(?=x\b|[^\w.%]|\.(?!\d)|$)")  # 2.81x, 98%, 0.985


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end >= 0 else None]


def _numbers(text: str) -> list[str]:
    text = re.sub(r"\[[^\]]*\]\([^)]*\)", "", text)  # links carry file names, not figures
    return [m.group(1) for m in NUMBER.finditer(text)]


def _matches(figure: str, pool: list[float]) -> bool:
    """``figure`` rounds from a number in ``pool``; a percentage may also stand there as a fraction."""
    percent = figure.endswith("%")
    figure = figure.rstrip("%")
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    want = float(figure)
    scales = (1.0, 100.0) if percent else (1.0,)
    return any(abs(round(v * k, decimals) - want) < 1e-9 for v in pool for k in scales)


def test_readme_numbers_stand_in_benchmarks() -> None:
    readme = _section((ROOT / "README.md").read_text(), "## What the numbers say")
    pool = [float(x.rstrip("%")) for x in _numbers((ROOT / "docs" / "benchmarks.md").read_text())]
    missing = [f for f in _numbers(readme) if not _matches(f, pool)]
    assert not missing, f"README numbers not found in docs/benchmarks.md: {missing}"
