"""The experts recipe end to end on a tiny real run folder: routing the corpus, per-category training
around the shared table, the manifest, resume, `--expert NAME` jobs, and `eval experts`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from experts_helpers import corpus, make_run, tiny_lm, write_jsonl
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.eval.perplexity import eval_experts
from taskmoe.experts.assign import assign
from taskmoe.io import load_tensors
from taskmoe.manifest import load_manifest
from taskmoe.training.config import TrainConfig
from taskmoe.training.recipes.experts import ExpertsRecipeConfig, setup, train_experts


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def _config(path: Path, **train) -> Path:
    cfg = ExpertsRecipeConfig(lm=tiny_lm(), seq_len=32, neighbours=3,
                              train=TrainConfig(**{"max_steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                                                   "eval_every": 6, "save_every": 6, "log_every": 1, "progress": False,
                                                   **train}))
    cfg.save(path)
    return path


def test_setup_routes_each_document_to_its_experts(run: Path) -> None:
    c = corpus()
    cfg = ExpertsRecipeConfig(lm=tiny_lm(), seq_len=32, neighbours=3)
    st = setup(run, c, cfg, progress=False)
    tok = st.router.tokenizer
    ids = tok.encode_batch([d.text for d in c.train], allow_special=False)
    again = assign(st.router.route_batch(ids))
    assert again.docs == st.assignment.docs
    assert sorted({i for v in st.assignment.docs.values() for i in v}) == list(range(len(c.train)))  # nobody dropped
    for name, d in st.data.items():
        # the expert's windows are exactly its routed documents, packed
        n_tokens = sum(len(ids[i]) + 2 for i in st.assignment.docs[name])
        assert len(d.train) == (n_tokens - 1) // cfg.seq_len
        assert not (d.train.neighbour_ids == torch.arange(len(d.train))[:, None]).any()
    # the router's categories track the three domains (a sanity check on the fixture itself)
    majority = set()
    for n in st.data:
        doms = [c.train[i].domain for i in st.assignment.docs[n]]
        top = max(set(doms), key=doms.count)
        assert doms.count(top) >= 0.9 * len(doms)
        majority.add(top)
    assert majority == {"code", "conversation", "legal"}
    with pytest.raises(ConfigError, match="unknown expert"):
        setup(run, c, cfg, ["nope"], progress=False)


def test_train_one_expert_then_all_then_resume(run: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl")
    cfg = _config(tmp_path / "cfg.json")
    rows = train_experts(run, expert="c1", source=str(src), config=cfg, progress=False)
    assert [r["expert"] for r in rows] == ["c1"] and rows[0]["steps"] == 12
    assert rows[0]["val_sem_sim"] is not None and rows[0]["val_ppl"] > 1
    assert json.loads((run / "taskmoe.json").read_text())["experts"] == {"1": "experts/c1"}
    assert "embedding.weight" not in load_tensors(run / "experts" / "c1" / "model.safetensors")
    c1 = load_tensors(run / "experts" / "c1" / "model.safetensors")

    rows = train_experts(run, source=str(src), config=cfg, progress=False)  # all: c1 resumes at its last step
    assert [r["expert"] for r in rows] == ["c0", "c1", "c2"]
    res = load_manifest(run)
    assert sorted(res.experts) == [0, 1, 2] and res.manifest.vocab_size == 400
    again = load_tensors(run / "experts" / "c1" / "model.safetensors")
    assert all(torch.equal(c1[k], again[k]) for k in c1)
    lines = (run / "train" / "experts" / "c1" / "metrics.jsonl").read_text().splitlines()
    assert sum(1 for ln in lines if json.loads(ln)["kind"] == "train") == 12  # nothing retrained


def test_eval_experts_matrix_and_routing(run: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", per_domain=60)
    train_experts(run, source=str(src), config=_config(tmp_path / "cfg.json", max_steps=20), progress=False)
    eval_experts(run, split="train", source=str(src), domain_field="domain", seq_len=64, route_tokens=16,
                 max_doc_tokens=128, progress=False)
    rep = json.loads((run / "reports" / "expert_perplexity.json").read_text())
    assert (run / "reports" / "expert_perplexity.png").stat().st_size > 1000
    matrix, routed = rep["matrix"], {r["model"]: r for r in rep["routed"]}
    for dom in ("code", "conversation", "legal"):
        col = sorted(r[dom] for r in matrix)
        assert col[0] * 2 < col[1]  # one expert is the specialist of each domain
        assert routed["mixture: top1"][dom] == pytest.approx(col[0], rel=0.05)  # and routing finds it
    assert routed["mixture: top1"]["all"] < min(r["all"] for r in matrix)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no router in the run folder"):
        setup(tmp_path, corpus(), ExpertsRecipeConfig(), progress=False)
    with pytest.raises(ConfigError, match="lam"):
        train_experts(tmp_path, lam=1.5)  # the flags are validated before any work
