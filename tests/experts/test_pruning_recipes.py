"""The seed's pruning where the seed puts it, on a tiny real run: during expert training (an expert the
router does not send its own training sequences to stops, is not saved and is recorded as pruned) and
during mixture training (`taskmoe train mixture`: an expert no window of the corpus is routed to is
pruned from the mixture); either way the run loads and routes the pruned category elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from experts_helpers import corpus, documents, make_run, tiny_lm
from taskmoe.inference.loader import load_system
from taskmoe.training.config import TrainConfig
from taskmoe.training.recipes.experts import ExpertsRecipeConfig, register_experts, setup, train_expert
from taskmoe.training.recipes.mixture import train_mixture


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _cfg(steps: int = 8) -> ExpertsRecipeConfig:
    return ExpertsRecipeConfig(lm=tiny_lm(), seq_len=32, neighbours=3,
                               train=TrainConfig(max_steps=steps, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0,
                                                 save_every=4, progress=False))


def _train_all(run: Path, st, planted: str | None = None) -> dict[str, dict]:
    rows = {}
    for name in st.data:
        if name == planted:  # the router gives this expert no weight on any of its training windows
            st.data[name].route_weights = torch.zeros_like(st.data[name].route_weights)
        _, rows[name] = train_expert(name, st)
        register_experts(run, st.router, [name])
    return rows


def test_an_expert_that_does_not_contribute_to_its_own_training_is_pruned_and_the_run_routes_around_it(run: Path):
    st = setup(run, corpus(), _cfg(), progress=False)
    assert all(float(d.route_weights.gt(0).float().mean()) > 0.9 for d in st.data.values())  # routed back to itself
    rows = _train_all(run, st, planted="c1")
    # window 0 = the first 10 training sequences: 4 + 4 + 2 of step 3's 4 rows; it closes inside step 3
    assert rows["c1"]["pruned"] == {"stage": "experts", "step": 3, "window": 0, "pruned": ["c1"], "counts": {"c1": 0}}
    assert rows["c1"]["steps"] == 3 and "folder" not in rows["c1"]  # training stopped; nothing saved
    assert rows["c0"]["steps"] == rows["c2"]["steps"] == 8 and "pruned" not in rows["c0"]
    m = json.loads((run / "taskmoe.json").read_text())
    assert m["experts"] == {"0": "experts/c0", "2": "experts/c2"} and not (run / "experts" / "c1").exists()
    assert m["pruned"] == {"1": {"expert": "c1", **rows["c1"]["pruned"]}}

    system = load_system(run)
    assert system.router.unavailable == {1}
    texts = {d["domain"]: d["text"][:200] for d in documents(2, seed=5)}
    decisions = system.router.route_batch([system.encode(t) for t in texts.values()])
    assert all(1 not in d.selected and d.selected for d in decisions)
    out = system.generate_batch(list(texts.values()), max_new_tokens=4, trace=True)
    assert {e.name for a in out for e in a.trace.experts} <= {"c0", "c2"}

    register_experts(run, st.router, ["c1"])  # a pruned expert stays pruned until its entry is removed
    assert json.loads((run / "taskmoe.json").read_text())["experts"] == m["experts"]


def test_train_mixture_keeps_the_expert_the_corpus_is_routed_to_and_prunes_the_others(run: Path, tmp_path: Path):
    st = setup(run, corpus(), _cfg(), progress=False)
    _train_all(run, st)
    tok = st.router.tokenizer
    legal = [d for d in documents(40) if d["domain"] == "legal"]
    (owner,) = {st.router.categories[d.top] for d in st.router.route_batch(tok.encode_batch([d["text"] for d in legal]))}
    src = tmp_path / "legal.jsonl"  # a corpus of one domain: the other two experts get small weights at most
    src.write_text("".join(json.dumps(d) + "\n" for d in legal))
    weights = lambda: {n: (run / "experts" / n / "model.safetensors").read_bytes() for n in ("c0", "c1", "c2")}  # noqa: E731
    before = weights()
    rows = train_mixture(run, steps=8, batch_size=4, lr=1e-3, seq_len=32, source=str(src), progress=False)
    assert {r["status"] for r in rows} == {"kept"}  # every expert gets some weight on most windows: all contribute
    mid = weights()
    assert all(mid[n] != before[n] for n in mid)  # all three fine-tuned and written back
    shutil.rmtree(run / "train" / "mixture")
    rows = train_mixture(run, steps=8, batch_size=4, lr=1e-3, seq_len=32, min_weight=0.3, source=str(src),
                         progress=False)  # a contribution now needs a weight >= 0.3
    status = {r["expert"]: r["status"] for r in rows}
    assert status == {n: "kept" if n == owner else "pruned" for n in ("c0", "c1", "c2")}
    # both pruned when the first window of 10 sequences closes, inside step 3
    assert {(r["step"], r["window"]) for r in rows if r["status"] == "pruned"} == {(3, 0)}
    m = json.loads((run / "taskmoe.json").read_text())
    assert list(m["experts"]) == [str(st.router.categories.index(owner))]
    assert {r["expert"]: (r["stage"], r["counts"][r["expert"]] < 3) for r in m["pruned"].values()} == {
        n: ("mixture", True) for n in status if n != owner}
    after = weights()
    assert {n: after[n] != mid[n] for n in after} == {n: n == owner for n in after}  # pruned ones left as they were
    system = load_system(run)
    assert len(system.router.unavailable) == 2
    d = system.router.route_batch([tok.encode("hello, how was the movie? the dinner was fun, thanks!")])[0]
    assert d.selected == [st.router.categories.index(owner)]  # a chat prompt goes to the one expert left
