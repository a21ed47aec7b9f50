"""The layering contract (imports flow downward only) holds: runs import-linter on pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract() -> None:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
