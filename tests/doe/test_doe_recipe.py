"""The DOE recipe: per-document windows with the prompt masked, train doe / doe report / doe add-expert end to end."""

from __future__ import annotations

import json

import torch

from taskmoe.doe.model import load_doe
from taskmoe.io import load_tensors
from taskmoe.training.recipes.doe import DocumentWindows, add_expert, doe_report, train_doe

TINY = dict(max_docs_per_domain=12, vocab_size=512, seq_len=48, prompt_len=12)


def test_document_windows_hand_example() -> None:
    # doc [5..10] -> stream [bos=1, 5, 6, 7, 8, 9, 10]; windows of seq_len + 1 = 5 tokens, stride 4
    d = DocumentWindows([[5, 6, 7, 8, 9, 10]], [2], [1], seq_len=4, prompt_len=2, bos_id=1, pad_id=0, min_targets=1)
    assert len(d) == 2
    a, b = d[0], d[1]
    assert a["input_ids"].tolist() == [1, 5, 6, 7]
    assert a["targets"].tolist() == [-100, 6, 7, 8]  # target at t < prompt_len - 1 was seen by routing
    assert a["prompt_mask"].tolist() == [True, True, False, False]
    assert b["input_ids"].tolist() == [8, 9, 10, 0]
    assert b["targets"].tolist() == [-100, 10, -100, -100]  # padding is never a target
    assert int(a["domain"]) == 2 and int(a["label"]) == 1


def test_train_doe_report_and_add_expert_end_to_end(tmp_path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "doe"
    summary = train_doe(out=out, experts=3, d_model=32, n_layers=2, n_heads=2, steps=4, batch_size=8, progress=False,
                        **TINY)
    assert summary["steps"] == 4
    assert summary["params_active"] == summary["dense_params"]  # top-1 DOE vs dense of the same active size
    for k in ("doe_val_ppl", "dense_val_ppl"):
        assert 1.0 < summary[k] < 10 * 512  # finite and below a 10x-uniform guess
    assert 0.0 <= summary["nmi_expert_vs_domain"] <= 1.0
    assert (out / "reports" / "doe_routing.png").stat().st_size > 0
    assert json.loads((out / "reports" / "metrics.json").read_text())["steps"] == 4
    model_dir = out / "model"
    assert load_doe(model_dir).expert_names == ("e0", "e1", "e2")

    table = doe_report(model=model_dir, split="train", max_docs_per_domain=12, seq_len=48, prompt_len=12, out=tmp_path / "rep")
    per_domain = {k: sum(r[k] for r in table) for k in table[0] if k not in ("category", "total")}
    assert set(per_domain) == {"code", "conversation", "legal", "literature"}
    assert sum(r["total"] for r in table) == sum(per_domain.values())

    res = add_expert(model=model_dir, name="legal_x", domain="legal", steps=3, batch_size=8, progress=False,
                     out=tmp_path / "plus", max_docs_per_domain=12, seq_len=48, prompt_len=12)
    assert res["experts"] == ["e0", "e1", "e2", "legal_x"]
    base, plus = load_tensors(model_dir / "model.safetensors"), load_tensors(tmp_path / "plus" / "model.safetensors")
    assert set(base) < set(plus)
    for k, v in base.items():  # nothing of the base model moved while the new expert trained
        assert torch.equal(plus[k], v), k
    assert any("legal_x" in k for k in set(plus) - set(base))
