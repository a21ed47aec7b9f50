"""The transposed-weight decode cache is opt-in: by default decoding uses nn.Linear's own weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from taskmoe.nn import Linear


def test_cache_off_by_default() -> None:
    lin = Linear(16, 8)
    x = torch.randn(2, 1, 16)
    with torch.no_grad():
        y = lin(x)
    assert lin._wt.value is None  # no transposed copy was built
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))
