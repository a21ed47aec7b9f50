"""Shared fixtures: deterministic torch, small thread count, and the optional ../shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# one intra-op thread per test process: the suite runs with pytest-xdist (-n 2), one worker per core
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The read-only shared data folder: $TASKMOE_SHARED, else ../shared beside the repo."""
    env = os.environ.get("TASKMOE_SHARED")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture
def shared() -> Path:
    d = shared_dir()
    if d is None:
        pytest.skip("needs the shared data folder: set TASKMOE_SHARED or place it at ../shared")
    return d


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
