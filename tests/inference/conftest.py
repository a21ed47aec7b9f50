"""The tiny IMoE run shared by the pipeline and stage tests (built once per test process)."""

from __future__ import annotations

import pytest
import torch

from pipeline_helpers import build_run


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_run(tmp_path_factory.mktemp("run"))
    finally:
        torch.set_num_threads(n)
