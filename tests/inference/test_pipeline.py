"""The IMoE pipeline on a tiny real system (see pipeline_helpers): batch == alone, the trace holds
every decision, clarification on planted conflicts, the coding adapter on coding intent, the
experts-only ensemble, the cross-talk hook, and clear load errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import taskmoe
from pipeline_helpers import prompts, variant as _variant
from taskmoe.errors import CheckpointError, RequestError
from taskmoe.experts.ensemble import mixture_logprobs
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.inference.pipeline import PipelineConfig, System, prompt_head
from taskmoe.layers.lora import use_adapter
from taskmoe.summarizer.fuser import Draft, FusionFormat

PEN = PipelineConfig().repetition_penalty  # the pipeline's default answer penalty (run manifests keep the default)
DRAFT_PEN = PipelineConfig().draft_repetition_penalty


@pytest.fixture
def system(run) -> System:
    return taskmoe.load(run)


def _greedy_ref(step, prompt, n, eos, penalty=PEN):
    """Reference decoding: a full forward per token (no state), penalised argmax, stop at eos.
    ``step(ids (1, T)) -> next-token scores (V,)``."""
    seq, out = list(prompt), []
    for _ in range(n):
        s = step(torch.tensor([seq]))
        seen = torch.zeros_like(s, dtype=torch.bool)
        seen[torch.tensor(seq)] = True
        s = torch.where(seen, torch.where(s > 0, s / penalty, s * penalty), s)
        t = int(s.argmax())
        if t == eos:
            break
        out.append(t)
        seq.append(t)
    return out


def _batch_prompts():
    p = prompts()
    return [p["code"], p["legal"], p["chat"], p["code"][:30] + " " + p["legal"][:40], "", p["legal"], p["code"]]


def test_batch_equals_each_prompt_alone(system: System) -> None:
    ps = _batch_prompts()
    batch = system.generate_batch(ps)
    alone = [system.generate(p) for p in ps]
    for b, a in zip(batch, alone):
        assert b.ids == a.ids and b.text == a.text
        tb, ta = b.trace, a.trace
        assert (tb.routing["selected"], tb.adapter, tb.clarify) == (ta.routing["selected"], ta.adapter, ta.clarify)
        assert [(d.expert, d.text) for d in tb.drafts] == [(d.expert, d.text) for d in ta.drafts]
        assert tb.batch_size == len(ps) and ta.batch_size == 1
    answered = [b for b in batch if not b.trace.clarify]
    # the batch really mixes: different experts, adapter on some rows and off on others, a clarification
    assert len({tuple(b.trace.routing["selected"]) for b in answered}) >= 2
    assert {b.trace.adapter for b in answered} == {"code", None}
    assert any(b.trace.clarify for b in batch)
    assert len({tuple(b.ids) for b in answered}) >= 2


def test_trace_records_every_decision(run) -> None:
    system = taskmoe.load(run)  # fresh: nothing resident yet
    p = prompts()["code"]
    a = system.generate(p)
    tr = a.trace
    r = tr.routing
    assert math.isclose(sum(r["confidences"]), 1.0, abs_tol=1e-5)
    th = json.loads((run / "taskmoe.json").read_text())["thresholds"]
    want_tc = th["t_C_base"] * (1 - math.log1p(th["k"] * r["c_S"]) / math.log1p(th["k"]))  # t_C formula by hand
    assert r["t_C"] == pytest.approx(want_tc)
    assert all(r["confidences"][i] > r["t_C"] for i in r["selected"]) and not r["fallback"]
    assert [e.status for e in tr.experts] == ["loaded"] * len(tr.experts) and all(e.load_s > 0 for e in tr.experts)
    assert [e.category for e in tr.experts] == r["selected_names"]
    assert [e.status for e in system.generate(p).trace.experts] == ["cached"] * len(tr.experts)
    # each draft is that expert's own greedy continuation of <|bos|> + prompt
    tok = system.tokenizer
    ids = tok.encode(p, allow_special=False)
    for d in tr.drafts:
        ref = generate(system.store.get(d.expert), [[tok.bos_id, *ids]],
                       GenerationConfig(max_new_tokens=8, temperature=0.0, repetition_penalty=DRAFT_PEN,
                                        stop_tokens=[tok.eos_id]))[0]
        assert d.text == tok.decode(ref, skip_special=True) and d.tokens == len(ref)
    assert set(tr.timings) == {"tokenize", "route", "drafts", "crosstalk", "intent", "disagreement", "summarize"}
    assert tr.disagreement is not None and tr.disagreement["score"] <= tr.disagreement["threshold"] and not tr.clarify
    assert tr.intent["label"] == "code" and tr.adapter == "code" and tr.crosstalk is None
    assert tr.answer_tokens == len(a.ids) and tr.prompt == p
    json.dumps(a.to_dict())  # JSON-safe as a whole


def test_answer_is_the_summarizer_continuation_with_the_adapter_on_code_intent(system: System) -> None:
    tok, summ = system.tokenizer, system.summarizer
    fmt = FusionFormat(tok, max_len=128)
    eos = tok.eos_id

    def step_with(adapter):
        def step(x):
            with use_adapter(summ, adapter):
                return summ(x).logits[0, -1]
        return step

    for name, want_adapter in (("code", "code"), ("legal", None)):
        a = system.generate(prompts()[name])
        assert a.trace.adapter == want_adapter and not a.trace.clarify
        drafts = [Draft(d.expert, d.confidence, tuple(tok.encode(d.text, allow_special=False))) for d in a.trace.drafts]
        fused = fmt.build(tok.encode(prompts()[name], allow_special=False), drafts).ids
        with torch.no_grad():
            assert a.ids == _greedy_ref(step_with(want_adapter), fused, 8, eos)
            if want_adapter:  # the adapter changes the answer: it really ran
                assert a.ids != _greedy_ref(step_with(None), fused, 8, eos)
    # the intent head reads <|bos|><|user|> prompt with the adapter off
    head = prompt_head(fmt, tok.encode(prompts()["code"], allow_special=False))
    probs = system.intent.predict(system.features([head]))[0].probs
    assert probs["code"] > 0.5


class PlantedCrosstalk:
    """A cross-talk runner that replaces the pair's drafts with planted texts (and records calls)."""

    trained = True

    def __init__(self, tok, texts):
        self.tok, self.texts, self.calls = tok, texts, []

    def run_batch(self, prompts, speakers, confidences, drafts, emit=None):
        out = []
        for conf, ds in zip(confidences, drafts):
            names = [n for n, _ in speakers]
            order = sorted(range(2), key=lambda k: -conf[k])  # most confident first
            self.calls.append(([names[k] for k in order], [d.expert for d in ds]))
            new = [Draft(names[k], conf[k], tuple(self.tok.encode(t, allow_special=False))) for k, t in zip(order, self.texts)]
            out.append((new, [{"expert": names[k], "text": t, "interrupted": i > 0}
                              for i, (k, t) in enumerate(zip(order, self.texts))]))
        return out


def test_planted_conflict_asks_for_clarification_and_agreement_answers(run, tmp_path) -> None:
    # t_C_base = 0 selects every category, t_CT = 1 flags the top pair for cross-talk on every prompt
    folder = _variant(run, tmp_path, thresholds={"t_C_base": 0.0, "k": 4.0, "t_CT": 1.0})
    p = prompts()
    code_text = "def return import class self lambda yield print range len dict list " * 2
    legal_text = "licensee licensor warranty shall agreement party liability clause herein consent " * 2
    conflict = PlantedCrosstalk(None, [code_text, legal_text])
    sys_c = taskmoe.load(folder, crosstalk=conflict)
    conflict.tok = sys_c.tokenizer
    a = sys_c.generate(p["chat"])
    tr = a.trace
    assert tr.crosstalk["ran"] and [t["text"] for t in tr.crosstalk["turns"]] == [code_text, legal_text]
    pair = tr.crosstalk["pair"]
    assert conflict.calls[0][0] == pair and sorted(conflict.calls[0][1]) == sorted(pair)
    assert tr.clarify and a.ids == [] and "summarize" not in tr.timings
    assert tr.disagreement["score"] > tr.disagreement["threshold"]
    assert set(tr.disagreement["conflict"]) <= set(pair) | {d.expert for d in tr.drafts}
    for name in tr.disagreement["conflict"]:
        assert f"'{name}' expert" in a.text
    assert "clarify" in a.text and a.text == tr.clarification
    # natural agreement: both speakers say the same legal thing -> the summarizer answers
    agree = PlantedCrosstalk(None, [legal_text, legal_text])
    sys_a = taskmoe.load(folder, crosstalk=agree, config=sys_c.config.replace(
        disagreement=sys_c.config.disagreement.replace(threshold=0.99)))
    agree.tok = sys_a.tokenizer
    b = sys_a.generate(p["legal"])
    pair_conf = {d.expert for d in b.trace.drafts if d.text.strip() == legal_text.strip()}
    assert pair_conf == set(b.trace.crosstalk["pair"])
    assert not b.trace.clarify and "summarize" in b.trace.timings
    assert set(b.trace.fusion["experts"]) == {d.expert for d in b.trace.drafts}
    # a run without a crosstalk/ folder talks with the untrained experts (base weights) and says so
    c = taskmoe.load(folder).generate(p["legal"])
    ct = c.trace.crosstalk
    assert ct["ran"] and ct["adapters"].startswith("none") and ct["turns"] and {t["expert"] for t in ct["turns"]} <= set(ct["pair"])
    off = taskmoe.load(folder, config=sys_c.config.replace(crosstalk=False)).generate(p["legal"]).trace.crosstalk
    assert off["ran"] is False and "switched off" in off["reason"]
    bare = taskmoe.load(folder)
    bare.crosstalk = None
    assert "no cross-talk runner" in bare.generate(p["legal"]).trace.crosstalk["reason"]


def test_experts_only_mode_is_the_confidence_weighted_mixture(run, tmp_path) -> None:
    folder = _variant(run, tmp_path, summarizer=None, adapters={}, thresholds={"t_C_base": 0.0, "k": 4.0, "t_CT": 0.0})
    system = taskmoe.load(folder)
    assert system.mode == "ensemble"
    tok = system.tokenizer
    for p in (prompts()["chat"], prompts()["code"]):
        a = system.generate(p, repetition_penalty=1.0)
        d = system.route(p)
        assert a.trace.mode == "ensemble" and a.trace.drafts == [] and len(d.selected) >= 2
        models = [system.store.get(system.expert_of[c]) for c in d.selected_names]
        w = torch.tensor(d.weights)

        def step(x):
            return mixture_logprobs(torch.stack([m(x).logits[0, -1] for m in models]), w)

        with torch.no_grad():
            assert a.ids == _greedy_ref(step, [tok.bos_id, *tok.encode(p, allow_special=False)], 8, tok.eos_id, 1.0)
    ps = _batch_prompts()
    assert [x.ids for x in system.generate_batch(ps)] == [system.generate(p).ids for p in ps]


def test_lru_budget_keeps_answers_and_bounds_residency(run) -> None:
    small = taskmoe.load(run, max_experts=1)
    ps = _batch_prompts()
    assert [a.ids for a in small.generate_batch(ps)] == [a.ids for a in taskmoe.load(run).generate_batch(ps)]
    assert len(small.store.stats().resident) == 1


def test_bad_requests_are_clear(system: System) -> None:
    with pytest.raises(RequestError, match=r"unknown generation option\(s\) \['temp'\]"):
        system.generate("x", temp=0.5)
    with pytest.raises(RequestError, match="list of prompts"):
        system.generate_batch("one string")
    with pytest.raises(RequestError, match="prompt must be a string"):
        system.generate(123)  # type: ignore[arg-type]
    assert system.generate("hello", trace=False).trace is None


def test_load_errors_name_the_file_and_the_problem(run, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no taskmoe.json"):
        taskmoe.load(tmp_path)
    bad = tmp_path / "corrupt"
    shutil.copytree(run, bad)
    (bad / "taskmoe.json").write_text('{"tokenizer": "tokenizer.json", "router": ')
    with pytest.raises(CheckpointError, match=r"corrupt[/\\]taskmoe.json: not valid JSON"):
        taskmoe.load(bad)
    m = json.loads((run / "taskmoe.json").read_text())
    missing = _variant(run, tmp_path / "a", experts={**m["experts"], "1": "experts/c9"})
    with pytest.raises(CheckpointError, match=r"taskmoe.json: expert for category 1 'experts/c9' not found"):
        taskmoe.load(missing)
    uncovered = _variant(run, tmp_path / "b", experts={k: v for k, v in m["experts"].items() if k != "2"})
    with pytest.raises(CheckpointError, match=r"router categories \['2 \(c2\)'\] have no expert"):
        taskmoe.load(uncovered)
    extra = _variant(run, tmp_path / "c", experts={**m["experts"], "7": "experts/c0"})
    with pytest.raises(CheckpointError, match=r"experts named for categories \[7\], but the router has categories 0..2"):
        taskmoe.load(extra)
    vocab = _variant(run, tmp_path / "d", vocab_size=m["vocab_size"] + 1)
    with pytest.raises(CheckpointError, match="vocab_size"):
        taskmoe.load(vocab)
    pipe = _variant(run, tmp_path / "e", meta={"draft_tokens": 0})
    with pytest.raises(CheckpointError, match=r"meta.pipeline.*draft_tokens must be >= 1"):
        taskmoe.load(pipe)
    broken = _variant(run, tmp_path / "f")
    (broken / "experts" / "c0" / "model.safetensors").write_bytes(b"not safetensors")
    system = taskmoe.load(broken)  # lazy: experts are read on first use, and then fail clearly
    with pytest.raises(CheckpointError, match=r"c0[/\\]model.safetensors: corrupt or truncated"):
        system.generate_batch(_batch_prompts())
