"""The int4 weight-only op: the quantizer recovers a Q4_1 grid exactly, the kernel matches its float twin."""

from __future__ import annotations

import pytest
import torch

from taskmoe.ops.int4 import (dequantize_int4, has_int4_kernel, int4_linear, int4_linear_ref, pack_int4,
                              quantize_int4)


def q4_1_weight(n: int = 48, k: int = 64, g: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight already on a Q4_1 grid (codes 0..15 with both ends used per block, bf16-exact scale/min)."""
    q = torch.randint(0, 16, (n, k))
    q.view(n, -1, g)[..., 0], q.view(n, -1, g)[..., 1] = 0, 15
    scale = (torch.rand(n, k // g) * 0.05 + 0.01).bfloat16().float()
    lo = (torch.randn(n, k // g) * 0.1).bfloat16().float()
    return dequantize_int4(q.to(torch.uint8), scale, lo), q


def test_quantizer_recovers_a_q4_1_grid_exactly() -> None:
    w, q = q4_1_weight()
    q2, scale, lo = quantize_int4(w, 32)
    assert torch.equal(q2.long(), q)
    assert torch.allclose(dequantize_int4(q2, scale, lo), w, atol=1e-6)


def test_quantizer_error_is_at_most_half_a_step() -> None:
    w = torch.randn(40, 128)
    q, scale, lo = quantize_int4(w, 64)
    err = (dequantize_int4(q, scale, lo) - w).abs().reshape(40, 2, 64)
    assert bool((err <= scale[..., None] / 2 + 1e-6).all()) and q.max() <= 15


@pytest.mark.parametrize("kernel", [True, False])
def test_fast_form_equals_float_twin(kernel: bool) -> None:
    if kernel and not has_int4_kernel():
        pytest.skip("this torch has no CPU int4 kernel")
    w, _ = q4_1_weight()
    q, scale, lo = quantize_int4(w, 32)
    x = torch.randn(3, 5, 64)
    bias = torch.randn(48)
    fast = int4_linear(x, pack_int4(q, scale, lo, 32, kernel=kernel), bias)
    ref = int4_linear_ref(x, q, scale, lo, bias)
    assert fast.shape == (3, 5, 48) and fast.dtype == torch.float32
    # the kernel rounds activations to bfloat16 (8 bits of mantissa): relative error ~ 2^-8
    assert (fast - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of a group size"):
        quantize_int4(torch.randn(4, 48), 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4(torch.randn(4), 32)


def test_int8_rows_round_to_half_a_step_and_the_kernel_matches_its_twin() -> None:
    from taskmoe.ops.int8 import int8_linear, int8_linear_ref, quantize_int8

    w = torch.randn(40, 64)
    w[3] = 0.0  # an all-zero row gets scale 1 and codes 0
    q, scale = quantize_int8(w)
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()) and scale[3] == 1
    x = torch.randn(2, 3, 64)
    fast, ref = int8_linear(x, q, scale.bfloat16()), int8_linear_ref(x, q, scale)
    assert fast.shape == (2, 3, 40) and (fast - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()
