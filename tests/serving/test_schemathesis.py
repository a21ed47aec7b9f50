"""Robustness: schemathesis fuzzes every operation of ``/openapi.json`` on a live server with
``--checks all``: no server error, every response (JSON and every SSE event) matching the schema,
schema-valid requests accepted and invalid ones rejected -- 0 failures of any check.

Two runs: a **bounded** one in the default suite (few examples per operation, fixed seed, a time
budget of seconds) and the long slow one (``-m slow``, 90 s of fuzzing). By hand against any
running server: ``schemathesis run http://127.0.0.1:8000/openapi.json --checks all --max-time 120``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from serving_helpers import running
from taskmoe.serving.app import create_app
from taskmoe.serving.limits import Limits

# small generation limits keep each fuzzed request cheap; every other limit stays at its default
LIMITS = dict(max_max_tokens=8, default_max_tokens=4, max_n=2, max_body_bytes=65536)


def _schemathesis(backend, tmp_path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    with running(create_app(backend, Limits(**LIMITS), api_key="fuzz")) as srv:
        return subprocess.run(
            [exe, "run", f"{srv.url}/openapi.json", "--checks", "all", "-H", "Authorization: Bearer fuzz",
             "--seed", "1", *args],
            capture_output=True, text=True, cwd=tmp_path, timeout=600,
        )


def test_schemathesis_bounded_run_has_no_failures(backend, tmp_path) -> None:
    r = _schemathesis(backend, tmp_path, "--max-examples", "5", "--phases", "examples,fuzzing", "--workers", "1",
                      "--max-time", "30", "--generation-deterministic")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_schemathesis_finds_no_failures(backend, tmp_path) -> None:
    r = _schemathesis(backend, tmp_path, "--max-time", "90", "--workers", "2")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
