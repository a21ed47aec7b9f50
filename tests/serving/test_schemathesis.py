"""Robustness: schemathesis fuzzes every operation of ``/openapi.json`` on a live server; no request
may produce a server error, and responses (JSON and every SSE event) must match the schema.

Slow (about 1-2 minutes): ``python -m pytest tests/serving/test_schemathesis.py -m slow -p no:cacheprovider``.
By hand against any running server:
``schemathesis run http://127.0.0.1:8000/openapi.json --checks all --max-time 120``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from serving_helpers import running
from taskmoe.serving.app import create_app
from taskmoe.serving.limits import Limits


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(backend, tmp_path) -> None:
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    # small generation limits keep each fuzzed request cheap; every other limit stays at its default
    limits = Limits(max_max_tokens=8, default_max_tokens=4, max_n=2, max_body_bytes=65536)
    with running(create_app(backend, limits, api_key="fuzz")) as srv:
        r = subprocess.run(
            [exe, "run", f"{srv.url}/openapi.json", "--checks", "all", "--max-time", "90", "--workers", "2",
             "-H", "Authorization: Bearer fuzz", "--seed", "1"],
            capture_output=True, text=True, cwd=tmp_path, timeout=600,
        )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
