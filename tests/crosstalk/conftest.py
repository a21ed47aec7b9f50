"""Cross-talk tests run tiny models one token at a time: one intra-op thread is fastest for them
(and keeps them fast when other jobs share the cores), so each test runs with one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
