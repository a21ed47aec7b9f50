"""The crosstalk/ folder (save/load, clear errors) and the pipeline's runner: adapters loaded into the
store's experts and kept off outside cross-talk, the same transcript as in memory, the protocol's
output (one draft per speaker, one trace dict per turn); plus (slow) the whole path on a tiny run:
``train crosstalk`` -> ``taskmoe.load`` -> a trace showing turns and interruptions."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from crosstalk_helpers import tiny_expert, with_adapter
from taskmoe.crosstalk.dialogue import DialogueConfig, DialogueTokens, Speaker, run_crosstalk
from taskmoe.crosstalk.discriminator import Discriminator, DiscriminatorConfig
from taskmoe.crosstalk.policy import InterruptConfig
from taskmoe.crosstalk.runner import CrosstalkRunner, load_crosstalk, save_crosstalk
from taskmoe.errors import CheckpointError
from taskmoe.layers.lora import adapter_names, lora_layers, remove_adapters
from taskmoe.summarizer.fuser import Draft

DCFG = DialogueConfig(max_new_tokens=20, n_turns=3, segment_tokens=4, min_segment_tokens=2, temperature=0.9,
                      interrupt=InterruptConfig(shr=-3.0))  # p >= 0.95: interruptions are near certain


@pytest.fixture(scope="module")
def tok():
    from taskmoe.data.tokenizer import Tokenizer

    texts = ["The licensee shall keep the notice. Is that clear? Yes!", "Shall I compare thee to a summer's day?\n"] * 10
    return Tokenizer.train(texts, vocab_size=300, show_progress=False)


@pytest.fixture()
def saved(tmp_path, tok):
    V = tok.vocab_size
    a, b = with_adapter(tiny_expert(1, V), seed=1), with_adapter(tiny_expert(2, V), seed=2)
    disc = Discriminator(DiscriminatorConfig(vocab_size=V, d_model=16))
    folder = save_crosstalk(tmp_path / "crosstalk", [a, b], ["law", "poet"], disc, adapter="crosstalk", dialogue=DCFG,
                            gan={"reward": "soft"}, meta={"report": {"x": 1}})
    return folder, a, b, disc


def base_copy(model):
    m = copy.deepcopy(model)
    remove_adapters(m)
    return m


def test_save_and_load_crosstalk_folder(saved) -> None:
    folder, a, b, disc = saved
    ct = load_crosstalk(folder)
    assert ct.experts == ["law", "poet"] and ct.adapter == "crosstalk" and ct.dialogue == DCFG
    assert ct.meta == {"report": {"x": 1}} and ct.config["gan"] == {"reward": "soft"}
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(ct.discriminator()(ids), disc.eval()(ids))
    shutil.rmtree(folder / "adapters" / "poet")
    with pytest.raises(CheckpointError, match="adapter folder .*poet.* is missing"):
        load_crosstalk(folder)
    with pytest.raises(CheckpointError, match="holds a 'lora_adapter'"):
        load_crosstalk(folder / "adapters" / "law")


def test_runner_loads_adapters_and_matches_the_in_memory_dialogue(saved, tok) -> None:
    folder, a, b, _ = saved
    runner = CrosstalkRunner.from_folder(folder, tok, seed=7)
    fresh_a, fresh_b = base_copy(a), base_copy(b)  # what the expert store hands over: base experts
    prompt = tok.encode("The licensee shall", allow_special=False)
    own = [Draft("law", 0.5, (1, 2)), Draft("poet", 0.45, (3,))]
    drafts, turns = runner(prompt, [("law", 0.5, fresh_a), ("poet", 0.45, fresh_b)], own)
    # adapters were loaded, and switched off for the experts' ordinary use
    for m in (fresh_a, fresh_b):
        assert adapter_names(m) == ["crosstalk"]
        assert all(not layer.enabled for layer in lora_layers(m).values())
    # the same transcript as the in-memory experts with their adapters
    want = run_crosstalk(Speaker("law", a, "crosstalk"), Speaker("poet", b, "crosstalk"), [tok.bos_id, *prompt],
                         (0.5, 0.45), DCFG, torch.Generator().manual_seed(7), tokens=DialogueTokens.from_tokenizer(tok))
    assert drafts == want.drafts(own)
    assert [t["tokens"] for t in turns] == [len(t.ids) for t in want.turns]
    assert [t["interrupted"] for t in turns] == [False] + [True] * (len(turns) - 1)
    assert turns[0]["text"] == tok.decode(list(want.turns[0].ids), skip_special=True)
    assert len(turns) >= 2  # shr < 0 makes interruptions likely: the test exercises them
    assert json.loads(json.dumps(turns)) == turns  # JSON-safe for the trace
    # a second call (adapters already present) gives the same result
    assert runner(prompt, [("law", 0.5, fresh_a), ("poet", 0.45, fresh_b)], own) == (drafts, turns)


def test_runner_without_adapters_talks_with_base_experts(tok) -> None:
    V = tok.vocab_size
    a, b = tiny_expert(1, V), tiny_expert(2, V)
    runner = CrosstalkRunner(tok, DCFG, seed=3)
    drafts, turns = runner([5, 6, 7], [("x", 0.6, a), ("y", 0.55, b)], [])
    assert adapter_names(a) == [] and {d.expert for d in drafts} <= {"x", "y"} and turns[0]["expert"] == "x"


@pytest.mark.slow
def test_train_crosstalk_then_pipeline_trace(tmp_path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))
    from pipeline_helpers import build_run, prompts, texts

    import taskmoe
    from taskmoe.data.tokenizer import Tokenizer
    from taskmoe.manifest import load_manifest
    from taskmoe.training.recipes.crosstalk import train_crosstalk

    run = build_run(tmp_path / "run", t_C_base=0.0, t_CT=1.0)  # every prompt selects all and flags the top pair
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for v in texts(40, 3).values() for t in v))
    out = train_crosstalk(run, source=str(src), steps=4, batch_size=4, prompt_tokens=8, progress=False)
    assert out["steps"] == 4 and Path(out["plot"]).is_file()
    res = load_manifest(run)
    assert res.crosstalk == (run / "crosstalk").resolve()
    recs = [json.loads(x) for x in (run / "crosstalk" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all("d_acc" in r and "reward" in r for r in recs if r["kind"] == "train")
    report = json.loads((run / "crosstalk" / "report.json").read_text())
    assert set(report["discriminator"]) == {"before", "after"} and len(report["perplexity"]) == 2
    tok = Tokenizer.load(res.tokenizer)
    cfg = load_crosstalk(run / "crosstalk").dialogue.replace(interrupt=InterruptConfig(shr=-2.0))  # interrupt often
    system = taskmoe.load(run, crosstalk=CrosstalkRunner.from_folder(run / "crosstalk", tok, cfg=cfg))
    trace = system.generate(prompts()["code"]).trace
    ct = trace.crosstalk
    assert ct["ran"] and len(ct["turns"]) >= 2 and ct["turns"][1]["interrupted"]
    assert {t["expert"] for t in ct["turns"]} == set(ct["pair"])
