"""``taskmoe serve``: registered and parsing, the [serve] extra stays optional, loading errors name
the file, and the real command serves a saved model folder in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from serving_helpers import client, few_kb_of_text
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.cli import build_app
from taskmoe.errors import CheckpointError
from taskmoe.serving import ServeExtraMissing, require_serve_extra
from taskmoe.serving.backends.lm import LMBackend


def test_serve_is_registered_and_parses() -> None:
    r = CliRunner().invoke(build_app(), ["serve", "--help"])
    assert r.exit_code == 0 and "--api-key" in r.output and "127.0.0.1" in r.output


def test_core_imports_without_the_serve_extra() -> None:
    code = ("import sys, taskmoe, taskmoe.serving, taskmoe.serving.serve, taskmoe.cli.table; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_extra_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr("taskmoe.serving.SERVE_EXTRA_MODULES", ("fastapi", "no_such_module_xyz"))
    with pytest.raises(ServeExtraMissing, match=r"no_such_module_xyz.*pip install 'taskmoe\[serve\]'"):
        require_serve_extra()


def test_loading_errors(models_dir, tmp_path, tokenizer) -> None:
    assert LMBackend.load(models_dir / "expert", name="mine").model_ids() == ["mine"]
    with pytest.raises(CheckpointError, match="no such folder|not a folder"):
        LMBackend.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        LMBackend.load(tmp_path / "empty")
    shutil.copytree(models_dir / "expert", tmp_path / "lonely")
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json found"):
        LMBackend.load(tmp_path / "lonely")
    Tokenizer.train(few_kb_of_text(), vocab_size=500, show_progress=False).save(tmp_path / "lonely" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="vocabulary size mismatch"):
        LMBackend.load(tmp_path / "lonely")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_end_to_end(models_dir) -> None:
    port = free_port()
    env = {**os.environ, "TASKMOE_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "taskmoe.cli", "serve", str(models_dir / "expert"), "--port", str(port),
                             "--name", "tiny", "--max-batch", "4", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t0 < 60, "server did not start"
            time.sleep(0.1)
        assert [m.id for m in client(url, api_key="k").models.list()] == ["tiny"]
        r = client(url, api_key="k").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                               max_tokens=4)
        assert r.choices[0].message.role == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
