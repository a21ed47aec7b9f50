"""Classifier head: ECE by hand, temperature recovery, LoRA identity/merge, class addition with replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmoe.errors import DataError
from taskmoe.router.classifier import (
    ClassifierConfig,
    add_class,
    expected_calibration_error,
    fit_head,
    fit_temperature,
    head_from_tensors,
)

from router_helpers import one_thread  # noqa: F401,E402

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n_per: int, k: int, d: int = 16, spread: float = 0.2, seed: int = 0, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(np.random.default_rng(123).normal(size=(d, d)))[0]
    x = np.concatenate([centers[start + i] + spread * rng.normal(size=(n_per, d)) for i in range(k)])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(k), n_per)


def test_ece_hand_values() -> None:
    # both rows in bin (0.8667, 0.9333]: accuracy 1/2, confidence 0.9 -> |0.5 - 0.9| = 0.4
    assert expected_calibration_error(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1])) == pytest.approx(0.4)
    # two bins: {0.6 right} and {1.0 right}: (1/2)|1 - 0.6| + (1/2)|1 - 1.0| = 0.2
    assert expected_calibration_error(np.array([[0.6, 0.4], [1.0, 0.0]]), np.array([0, 0]), n_bins=10) == pytest.approx(0.2)
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0)) == 0.0


def test_temperature_recovers_the_generating_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 5, generator=g) * 3
    y = torch.multinomial(torch.softmax(z / 2.0, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)


def test_temperature_stays_finite_on_separable_validation() -> None:
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]] * 20)
    y = torch.tensor([0, 1] * 20)
    t = fit_temperature(z, y)
    assert 0.05 < t < 1.0  # sharper than the raw logits, but the prior stops the run to 0
    assert fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == 1.0


def test_fit_head_learns_and_calibrates() -> None:
    x, y = blobs(100, 4)
    xv, yv = blobs(40, 4, seed=1)
    cfg = ClassifierConfig(hidden=32, epochs=20)
    head, m = fit_head(x, y, 4, cfg, xv, yv)
    assert m["train_acc"] > 0.97 and m["val_acc"] > 0.95
    assert m["val_nll"] <= m["val_nll_before"] + 1e-9
    p = head.probs(xv)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert float(head.temperature) == pytest.approx(m["temperature"])
    back = head_from_tensors(head.tensors())
    np.testing.assert_allclose(back.probs(xv), p)
    with pytest.raises(DataError):
        fit_head(np.zeros((0, 4)), np.zeros(0), 2, cfg)


@pytest.mark.parametrize("hidden", [32, 0])
def test_add_class_keeps_old_decisions_and_learns_the_new_one(hidden: int) -> None:
    x, y = blobs(100, 3)
    head, _ = fit_head(x, y, 3, ClassifierConfig(hidden=hidden, epochs=20), *blobs(30, 3, seed=1))
    x_new, _ = blobs(60, 1, seed=2, start=3)
    test_old, _ = blobs(50, 3, seed=3)
    test_new, _ = blobs(30, 1, seed=4, start=3)
    before = head.probs(test_old).argmax(1)
    new_head, m = add_class(head, x_new, x, ClassifierConfig(hidden=hidden, add_steps=300))
    assert new_head.probs(test_old).shape == (150, 4)
    assert (new_head.probs(test_old).argmax(1) == before).mean() >= 0.95
    assert (new_head.probs(test_new).argmax(1) == 3).mean() >= 0.9
    assert m["replay_agreement"] >= 0.95 and m["new_acc"] >= 0.9
    assert float(new_head.temperature) == float(head.temperature)
    # old logits are untouched: the ranking among old categories is identical everywhere
    p_old, p_new = head.probs(test_new), new_head.probs(test_new)[:, :3]
    np.testing.assert_array_equal(np.argsort(p_old, 1), np.argsort(p_new, 1))


@pytest.mark.parametrize("hidden", [8, 0])
def test_branch_head_merges_exactly(hidden: int) -> None:
    from taskmoe.router.classifier import _BranchHead, build_head

    head = build_head(6, 3, hidden, seed=1)
    head.temperature.fill_(1.7)
    branch = None
    if hidden:
        from taskmoe.layers.lora import LoRALinear
        from taskmoe.router.classifier import ADAPTER

        copy = torch.nn.Linear(6, hidden)
        copy.load_state_dict(head.hidden_layer.state_dict())
        branch = LoRALinear(copy)
        branch.add_adapter(ADAPTER, 2, 4.0)
        with torch.no_grad():
            branch.lora_B[ADAPTER].normal_()
    new_row = torch.nn.Linear(hidden or 6, 1)
    work = _BranchHead(head, branch, new_row)
    x = torch.randn(7, 6)
    merged = work.merged()
    torch.testing.assert_close(merged(x), work(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged(x)[:, :3], head(x))  # old logits untouched
    assert float(merged.temperature) == pytest.approx(1.7)
