"""Serving fixtures: a real tokenizer trained on a few KB of real text, real tiny LMs built with the
``taskmoe.nn`` builders (saved and loaded through ``save_lm``/``LMBackend.load``), and a real uvicorn
server on a free loopback port; the tiny IMoE run of the pipeline tests (``imoe_run``, built once)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import pytest
import torch

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.models import expert_lm, save_lm, transformer_lm

from serving_helpers import few_kb_of_text, running, tiny_config

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models decode fastest on one thread; on a shared, busy machine two spin-waiting OpenMP
    threads can make each step 10-100x slower. Restored after each module."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(few_kb_of_text(), vocab_size=400, show_progress=False)


@pytest.fixture(scope="session")
def models_dir(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two LM folders (expert_lm and transformer_lm) sharing one tokenizer.json."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    save_lm(expert_lm(tiny_config(tokenizer)), root / "expert", kind="expert")
    save_lm(transformer_lm(tiny_config(tokenizer)), root / "transformer", kind="lm")
    tokenizer.save(root / "tokenizer.json")
    return root


@pytest.fixture(scope="session")
def backend(models_dir: Path):
    from taskmoe.serving.backends.lm import LMBackend

    return LMBackend.load(models_dir)


@pytest.fixture(scope="module")
def server(backend) -> Iterator:
    """A server with default limits, no auth, serving "expert" and "transformer"."""
    from taskmoe.serving.app import create_app

    with running(create_app(backend)) as srv:
        yield srv


def _pipeline_helpers():
    path = Path(__file__).resolve().parents[1] / "inference" / "pipeline_helpers.py"
    spec = importlib.util.spec_from_file_location("pipeline_helpers_for_serving", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="session")
def imoe_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The pipeline tests' tiny IMoE run (router, 3 experts, summarizer + code adapter) and its prompts."""
    helpers = _pipeline_helpers()
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = helpers.build_run(tmp_path_factory.mktemp("imoe") / "run")
    finally:
        torch.set_num_threads(prev)
    return root, helpers.prompts()
