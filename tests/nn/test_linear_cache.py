"""The decode-path transposed weight cache: exact, invalidated on every weight change, off under autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pytest

from taskmoe.nn import Linear, decode_weight_cache, expert_lm, LMConfig


@pytest.fixture(autouse=True)
def _cache_on():
    """The cache is opt-in (off by default); these tests exercise it switched on."""
    with decode_weight_cache(True):
        yield


def test_fast_path_equals_f_linear_and_is_used() -> None:
    lin = Linear(16, 8)
    x = torch.randn(3, 1, 16)
    with torch.no_grad():
        y = lin(x)
    assert lin._wt.value is not None and lin._wt.value.shape == (16, 8) and lin._wt.value.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))


def test_not_used_with_grad_or_many_rows_or_disabled() -> None:
    lin = Linear(16, 8, bias=False)
    x = torch.randn(2, 16)
    lin(x).sum().backward()  # grad enabled: plain F.linear, gradients flow
    assert lin.weight.grad is not None and lin._wt.value is None
    with torch.no_grad():
        lin(torch.randn(64, 16))  # 64 rows > 16: a full matmul, no cache
        assert lin._wt.value is None
        with decode_weight_cache(False):
            lin(x)
        assert lin._wt.value is None


def test_invalidated_by_optimizer_step_and_load_state_dict() -> None:
    lin = Linear(4, 4, bias=False)
    x = torch.randn(1, 4)
    with torch.no_grad():
        before = lin(x)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    lin(x).sum().backward()
    opt.step()
    with torch.no_grad():
        after = lin(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, x @ lin.weight.T)
    lin.load_state_dict({"weight": torch.eye(4)})
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x)


def test_train_mode_drops_cache_and_head_cache_tracks_embedding() -> None:
    model = expert_lm(LMConfig(vocab_size=31, d_model=16, n_layers=2, n_heads=2)).eval()
    ids = torch.randint(0, 31, (1, 1))
    with torch.no_grad():
        model(ids)
        assert model._head_t.value is not None
        model.embedding.weight.mul_(2.0)  # in-place change: version bump
        out = model(ids)
    torch.testing.assert_close(out.logits, out.hidden @ model.embedding.weight.T)
    model.train()
    assert model._head_t.value is None and all(m._wt.value is None for m in model.modules() if isinstance(m, Linear))


def test_model_built_under_inference_mode_decodes() -> None:
    """Inference tensors carry no version counter: such weights bypass the cache instead of failing."""
    with torch.inference_mode():
        model = expert_lm(LMConfig(vocab_size=31, d_model=16, n_layers=2, n_heads=2)).eval()
        ids = torch.randint(0, 31, (2, 3))
        out = model(ids[:, :2], model.init_state(2))
        step = model(ids[:, 2:], out.state).logits
        torch.testing.assert_close(step, model(ids).logits[:, 2:], rtol=1e-4, atol=1e-5)
    assert model._head_t.value is None


def test_clear_decode_cache_frees_every_copy() -> None:
    from taskmoe.nn import clear_decode_cache

    model = expert_lm(LMConfig(vocab_size=31, d_model=16, n_layers=2, n_heads=2)).eval()
    with torch.no_grad():
        model(torch.randint(0, 31, (1, 1)))
    n_linear = sum(isinstance(m, Linear) for m in model.modules())
    assert clear_decode_cache(model) == n_linear + 1  # every projection + the tied head
    assert clear_decode_cache(model) == 0
