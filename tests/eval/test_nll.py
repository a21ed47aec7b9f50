"""The evaluation primitive: token NLL sums and counts, and the one progress bar."""

from __future__ import annotations

import math

import pytest
import torch

from taskmoe.eval.nll import IGNORE_INDEX, NLL, batched, corpus_nll, perplexity, picked_nll, row_nll
from taskmoe.progress import draws, progress_bar
from taskmoe.training.losses import lm_cross_entropy


def _batch(seed: int = 0, B: int = 3, T: int = 5, V: int = 7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = IGNORE_INDEX
    return z, y


def test_mean_equals_the_training_cross_entropy() -> None:
    z, y = _batch()
    got = NLL.of(z, y)
    assert got.tokens == int((y != IGNORE_INDEX).sum()) == 13
    assert got.mean == pytest.approx(float(lm_cross_entropy(z, y)), rel=1e-6)
    assert got.ppl == pytest.approx(math.exp(got.mean))


def test_by_hand_two_tokens() -> None:
    # uniform logits over V=4: every token costs log 4; the masked position costs nothing
    z = torch.zeros(1, 3, 4)
    y = torch.tensor([[1, 2, 3]])
    nll, n = row_nll(z, y, mask=torch.tensor([[1, 0, 1]]))
    assert n.tolist() == [2.0] and nll.item() == pytest.approx(2 * math.log(4))


def test_sums_do_not_depend_on_the_batching() -> None:
    z, y = _batch(B=6)
    whole = NLL.of(z, y)
    parts = sum((NLL.of(z[i : i + 2], y[i : i + 2]) for i in range(0, 6, 2)), NLL())
    assert parts.tokens == whole.tokens and parts.total == pytest.approx(whole.total, rel=1e-12)


def test_log_probs_and_picked_forms_agree() -> None:
    z, y = _batch()
    logp = z.log_softmax(-1)
    a, n = row_nll(z, y)
    b, _ = row_nll(logp, y, log_probs=True)
    c, m = picked_nll(logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1), y != IGNORE_INDEX)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(n, m)


def test_perplexity_overflow_and_empty() -> None:
    assert perplexity(800.0) == math.inf
    assert math.isnan(NLL().ppl)


def test_corpus_nll_restores_mode_and_matches_one_pass() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 11))
    data = [torch.randint(0, 11, (6,)) for _ in range(5)]
    forward = lambda b: (model(b[:, :-1]), b[:, 1:])  # noqa: E731
    got = corpus_nll(forward, batched(data, 2, torch.stack), model=model)
    assert model.training  # restored
    model.eval()
    x = torch.stack(data)
    with torch.no_grad():
        want = float(lm_cross_entropy(model(x[:, :-1]), x[:, 1:]))
    assert got.tokens == 25 and got.mean == pytest.approx(want, rel=1e-6)


def test_progress_bar_is_silent_off_a_terminal(capsys) -> None:
    assert not draws(True)  # pytest captures stderr: not a terminal
    with progress_bar(True, fields=("loss {task.fields[loss]}",)) as bar:
        t = bar.add_task("work", total=3, loss="-")
        bar.update(t, advance=3, loss="0.1")
    assert capsys.readouterr().err == ""
