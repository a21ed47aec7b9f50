"""The summarizer of a backbone system on a tiny random Llama (no real backbone): the chat-template fusion
format, exact resume, PEFT parity of the saved adapters, ``taskmoe.load`` in summarizer mode, and the coding
adapter switched on exactly the rows with coding intent."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "backbones"))
from backbone_helpers import backbone_experts_run  # noqa: E402

import taskmoe  # noqa: E402
from taskmoe.data.backbone_tokenizer import BackboneTokenizer  # noqa: E402
from taskmoe.errors import RequestError  # noqa: E402
from taskmoe.io import load_tensors, read_json  # noqa: E402
from taskmoe.summarizer.backbone_format import BackboneFusionFormat, backbone_header_text  # noqa: E402
from taskmoe.summarizer.fuser import IGNORE_INDEX, Draft  # noqa: E402
from taskmoe.training.config import TrainConfig  # noqa: E402
from taskmoe.training.recipes.backbone_summarizer import BackboneSummarizerConfig, train_backbone_summarizer  # noqa: E402


def _tc(steps: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=2, lr=1e-2, warmup_steps=1, eval_every=0, save_every=2,
                       eval_batches=1, progress=False)


CFG = BackboneSummarizerConfig(r=4, alpha=8.0, prompt_tokens=16, target_tokens=8, draft_tokens=6, max_len=160,
                               pairs_per_domain=3, val_pairs_per_domain=2, calibrate_per_domain=3,
                               train=_tc(4), adapter_train=_tc(2))


@pytest.fixture(scope="module")
def experts_run(tmp_path_factory):
    """A backbone run with a router and two LoRA experts, no summarizer yet."""
    root = tmp_path_factory.mktemp("bbsum")
    run = root / "experts_run"
    hf, _ = backbone_experts_run(root, run)
    return root, run, hf


@pytest.fixture(scope="module")
def corpus():
    from taskmoe.data.commands import get_corpus

    return get_corpus(None, max_docs_per_domain=6, progress=False)


@pytest.fixture(scope="module")
def summ_run(experts_run, corpus):
    root, run, hf = experts_run
    out = root / "summ_run"
    shutil.copytree(run, out)
    report = train_backbone_summarizer(out, corpus, CFG, progress=False)
    return out, hf, report


@pytest.fixture(scope="module")
def tok(experts_run):
    return BackboneTokenizer.load(experts_run[0] / "backbone")


# ------------------------------------------------------------------------------------------ format
def test_format_is_the_chat_template_with_the_answer_masked(tok):
    fmt = BackboneFusionFormat(tok, max_len=512)
    prompt = tok.encode("def parse_args(argv):", allow_special=False)
    bare = fmt.build(prompt, [])
    assert bare.ids == tok.encode_chat([{"role": "user", "content": "def parse_args(argv):"}])  # the template's own ids
    assert bare.answer_start == len(bare.ids) and fmt.head(prompt) == bare.ids
    drafts = [Draft("c1", 0.25, tuple(tok.encode(" lazy dog", allow_special=False))),
              Draft("c0", 0.75, tuple(tok.encode(" return argv", allow_special=False)))]
    answer = tok.encode(" the quick fox", allow_special=False)
    seq = fmt.build(prompt, drafts, answer)
    assert seq.experts == ["c0", "c1"]  # most confident first
    text = fmt.text("def parse_args(argv):", [("c1", 0.25, " lazy dog"), ("c0", 0.75, " return argv")])
    assert text.index(backbone_header_text("c0", 0.75)) < text.index(backbone_header_text("c1", 0.25))
    infer = fmt.build(prompt, drafts)
    assert seq.ids[: len(infer.ids)] == infer.ids and seq.answer_start == len(infer.ids)  # training extends inference
    assert seq.ids[seq.answer_start:] == [*answer, tok.eos_id]
    t = seq.targets()
    scored = [i for i, y in enumerate(t) if y != IGNORE_INDEX]
    assert scored == list(range(seq.answer_start - 1, len(seq.ids) - 1))  # exactly the answer tokens and eos
    assert [t[i] for i in scored] == [*answer, tok.eos_id]


def test_format_budget_cuts_drafts_never_the_question(tok):
    fmt = BackboneFusionFormat(tok, max_len=512)
    prompt = tok.encode("A software license is a contract.", allow_special=False)
    long = tuple(tok.encode(" the quick brown fox jumps over the lazy dog" * 4, allow_special=False))
    drafts = [Draft("c0", 0.9, long), Draft("c1", 0.1, long[:5])]
    full = fmt.build(prompt, drafts, [5, 6])
    budget = len(full.ids) - 20
    cut = fmt.build(prompt, drafts, [5, 6], max_len=budget)
    assert len(cut.ids) == budget and cut.truncated == {"c0": (len(long), len(long) - 20)} and not cut.dropped
    assert cut.ids[-3:] == [5, 6, tok.eos_id] and cut.answer_start == budget - 3
    bare = fmt.build(prompt, [], [5, 6])
    tiny = fmt.build(prompt, drafts, [5, 6], max_len=len(bare.ids) + 2)  # no draft's header fits: bare question
    assert tiny.dropped == ["c0", "c1"] and tiny.ids == bare.ids
    with pytest.raises(RequestError, match="budget"):
        fmt.build(prompt, drafts, [5, 6], max_len=len(bare.ids) - 1)


def test_training_sequences_end_with_eos_only_where_the_target_ends(tok):
    from taskmoe.summarizer.examples import FusionPair
    from taskmoe.training.recipes.backbone_summarizer import fusion_sequences

    fmt = BackboneFusionFormat(tok, max_len=512)
    cut, ended = FusionPair((5, 6, 7), (8, 9, 10, 11), "code", "a", "continuation"), FusionPair((5, 6), (8, 9), None, "b", "reply")
    a, b = fusion_sequences(fmt, [cut, ended], [[], []], target_tokens=4)
    assert a.ids[a.answer_start:] == [8, 9, 10, 11] and b.ids[b.answer_start:] == [8, 9, tok.eos_id]
    assert [y for y in a.targets() if y != IGNORE_INDEX] == [8, 9, 10, 11]


# ---------------------------------------------------------------------------------------- training
class _Crash(Exception):
    pass


class _CrashAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step, record):
        if step == self.step:
            raise _Crash(step)


def test_training_resumes_exactly(experts_run, corpus, summ_run, tmp_path):
    _, run, _ = experts_run
    ref, _, ref_report = summ_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    with pytest.raises(_Crash):
        train_backbone_summarizer(out, corpus, CFG, calibrate=False, progress=False, callbacks=[_CrashAt(3)])
    assert not (out / "summarizer").exists()
    torch.manual_seed(123)
    report = train_backbone_summarizer(out, corpus, CFG, calibrate=False, progress=False)
    assert report["fusion_final_loss"] == ref_report["fusion_final_loss"]
    for rel in ("adapter_model.safetensors", "adapters/code/adapter_model.safetensors"):
        a, b = load_tensors(out / "summarizer" / rel), load_tensors(ref / "summarizer" / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert (out / "drafts_backbone.jsonl").is_file()


def test_saved_adapters_load_in_peft_with_the_same_logits(summ_run):
    peft = pytest.importorskip("peft")
    run, hf, report = summ_run
    m = read_json(run / "taskmoe.json")
    assert m["summarizer"] == "summarizer" and m["adapters"] == {"code": "summarizer/adapters/code"}
    assert report["fusion_steps"] == 4 and report["code_steps"] == 2
    system = taskmoe.load(run)
    summ = system.summarizer
    ids = torch.tensor([[5, 17, 40, 99, 3, 250], [7, 8, 9, 10, 11, 12]])
    pm = peft.PeftModel.from_pretrained(hf, str(run / "summarizer"), adapter_name="fusion")
    pm.load_adapter(str(run / "summarizer" / "adapters" / "code"), adapter_name="code")
    pm.eval()
    pm.set_adapter("fusion")
    fusion = pm(ids).logits
    assert (summ(ids).logits - fusion).abs().max().item() < 1e-4
    pm.set_adapter("code")
    code = pm(ids).logits
    with summ.switch_adapter("code"):
        assert (summ(ids).logits - code).abs().max().item() < 1e-4
    with summ.switch_adapter("code", torch.tensor([True, False])):  # one forward, each row its own adapter
        mixed = summ(ids).logits
    assert (mixed[0] - code[0]).abs().max().item() < 1e-4 and (mixed[1] - fusion[1]).abs().max().item() < 1e-4
    assert (code - fusion).abs().max().item() > 0


# ----------------------------------------------------------------------------------------- pipeline
def _greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Reference decode: a full forward per token, argmax, stop at eos."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def test_loaded_system_answers_through_the_summarizer_with_a_trace(summ_run):
    run, _, _ = summ_run
    system = taskmoe.load(run)
    assert system.mode == "summarizer" and system.adapters == ["code"] and system.intent is not None
    assert 0.0 <= read_json(run / "taskmoe.json")["meta"]["pipeline"]["disagreement"]["threshold"] <= 1.0
    system.config = system.config.replace(disagreement=system.config.disagreement.replace(threshold=1.0))
    a = system.generate("the quick brown fox", max_new_tokens=5, repetition_penalty=1.0)
    tr = a.trace
    assert tr.mode == "summarizer" and tr.drafts
    assert tr.fusion["experts"] + tr.fusion["dropped"] == [d.expert for d in tr.drafts]  # most confident first
    assert tr.fusion["input_tokens"] > 0 and tr.intent is not None and "summarize" in tr.timings
    drafts = system.draft([system.encode("the quick brown fox")])[0]  # the same greedy drafts
    assert [d.expert for d in drafts] == [d.expert for d in tr.drafts]
    seq = system.fmt.build(system.encode("the quick brown fox"), drafts)
    assert len(seq.ids) == tr.fusion["input_tokens"]
    summ = system.summarizer
    if tr.adapter is None:
        want = _greedy(summ, seq.ids, 5, system.tokenizer.eos_id)
    else:
        with summ.switch_adapter(tr.adapter):
            want = _greedy(summ, seq.ids, 5, system.tokenizer.eos_id)
    assert a.ids == want


def test_coding_intent_switches_the_adapter_row_by_row(summ_run):
    from taskmoe.summarizer.intent import IntentClassifier

    run, _, _ = summ_run
    system = taskmoe.load(run)
    system.config = system.config.replace(disagreement=system.config.disagreement.replace(threshold=1.0))
    code_p, other_p = "def parse_args(argv): return argv", "hello world, this is a story"
    feats = system.features([system.fmt.head(system.encode(p)) for p in (code_p, other_p)])
    system.intent = IntentClassifier(["code", "other"], feats.shape[1], feature="summarizer_hidden").fit(feats, ["code", "other"])
    both = system.generate_batch([code_p, other_p], max_new_tokens=4, repetition_penalty=1.0)
    assert [a.trace.intent["label"] for a in both] == ["code", "other"]
    assert [a.trace.adapter for a in both] == ["code", None]
    alone = [system.generate(p, max_new_tokens=4, repetition_penalty=1.0) for p in (code_p, other_p)]
    assert [a.ids for a in both] == [a.ids for a in alone]  # the mixed batch equals each row alone
    ids = system.fmt.build(system.encode(code_p), system.draft([system.encode(code_p)])[0]).ids
    with system.summarizer.switch_adapter("code"):
        assert both[0].ids == _greedy(system.summarizer, ids, 4, system.tokenizer.eos_id)


def test_train_summarizer_command_dispatches_on_a_backbone_run(experts_run, tmp_path):
    from taskmoe.training.recipes.summarizer_run import train_summarizer

    _, run, _ = experts_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    row = train_summarizer(run=out, max_docs_per_domain=6, steps=2, adapter_steps=1, batch_size=2, draft_tokens=6,
                           prompt_tokens=16, target_tokens=8, max_len=160, calibrate=False, progress=False,
                           set=["pairs_per_domain=3", "val_pairs_per_domain=2", "r=2", "adapter_train.batch_size=2"])
    assert row["summarizer"].startswith("backbone LoRA") and row["fusion_steps"] == 2 and row["code_steps"] == 1
    cfg = read_json(out / "summarizer" / "adapter_config.json")
    assert cfg["r"] == 2 and cfg["peft_type"] == "LORA"
    assert taskmoe.load(out).mode == "summarizer"


def test_load_mode_chooses_summarizer_or_ensemble(experts_run, summ_run):
    from taskmoe.errors import ConfigError
    from taskmoe.inference.commands import generate_text

    run, _, _ = summ_run
    ens = taskmoe.load(run, mode="ensemble")
    assert ens.mode == "ensemble" and ens.summarizer is None
    a = ens.generate("the quick brown fox", max_new_tokens=4)
    assert a.trace.mode == "ensemble" and not a.trace.drafts
    assert generate_text(run, "the quick brown fox", max_new_tokens=4, mode="ensemble").text == a.text
    with pytest.raises(ConfigError, match="no summarizer"):
        taskmoe.load(experts_run[1], mode="summarizer")
    with pytest.raises(ConfigError, match="mode must be"):
        taskmoe.load(run, mode="fused")
