"""The summarizer recipe end to end on tiny real models: drafts are grouped by expert and cached
(a second pass generates nothing), fusion training lowers the answer loss, the coding adapter
trains only its own weights, and every artefact reloads from disk."""

from __future__ import annotations

import json

import pytest
import torch

from taskmoe.data.corpus import Corpus, Document
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.experts.store import ExpertStore
from taskmoe.models.builders import expert_lm, summarizer_lm
from taskmoe.models.checkpoint import load_lm, save_lm
from taskmoe.models.config import ConvConfig, ExpertLMConfig
from taskmoe.layers.lora import adapter_names, load_adapter
from taskmoe.router.policy import RoutingDecision
from taskmoe.summarizer.drafts import DraftCache, Drafter
from taskmoe.summarizer.intent import IntentClassifier
from taskmoe.training.config import TrainConfig
from taskmoe.training.recipes.summarizer import SummarizerRecipeConfig, run

CODE = ["def f{i}(x):\n    y = x * {i}\n    return y + {i}\n".format(i=i) * 2 for i in range(12)]
LEGAL = ["The licensee {i} shall not distribute the work without the written consent of the licensor.".format(i=i) for i in range(12)]
CHAT = ["A: hello number {i}\nB: hi there {i}\nA: how are you\nB: fine thanks".format(i=i) for i in range(12)]


class RuleRouter:
    """A stand-in router with the real RoutingDecision: prompts with a newline -> 'code' (0.8),
    otherwise both experts run ('legal' 0.6, 'code' 0.4)."""

    categories = ["code", "legal"]

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.calls = 0

    def route_batch(self, seqs):
        self.calls += 1
        out = []
        for s in seqs:
            if "\n" in self.tok.decode(s):
                out.append(RoutingDecision([0.8, 0.2], 0.5, 0.5, [0], [1.0], False, None, self.categories))
            else:
                out.append(RoutingDecision([0.4, 0.6], 0.5, 0.5, [1, 0], [0.6, 0.4], False, None, self.categories))
        return out


class CountingGreedy:
    """Greedy decoding by repeated full forward passes (the plain reference; counts prompts)."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id, self.prompts = eos_id, 0

    @torch.no_grad()
    def __call__(self, model, prompts, max_new_tokens):
        self.prompts += len(prompts)
        outs = []
        for p in prompts:
            ids, new = list(p), []
            for _ in range(max_new_tokens):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == self.eos_id:
                    break
                new.append(nxt)
                ids.append(nxt)
            outs.append(new)
        return outs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("summ")
    tok = Tokenizer.train(CODE + LEGAL + CHAT, vocab_size=320)
    torch.manual_seed(0)
    cfg = ExpertLMConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, conv=ConvConfig(levels=2))
    emb = torch.nn.Embedding(tok.vocab_size, 16)
    for name in ("code", "legal"):
        save_lm(expert_lm(cfg, emb), root / "experts" / name, kind="expert", include_embedding=False)
    store = ExpertStore(lambda folder: load_lm(folder, embedding=emb))
    store.register_dir(root / "experts")
    docs = {"train": [], "validation": []}
    for dom, texts in (("code", CODE), ("legal", LEGAL), ("conversation", CHAT)):
        for i, t in enumerate(texts):
            docs["train" if i < 9 else "validation"].append(Document(t, dom, "test"))
    return root, tok, cfg, emb, store, Corpus(docs)


def test_drafts_grouped_by_expert_and_cached(setup, tmp_path) -> None:
    root, tok, cfg, emb, store, corpus = setup
    gen = CountingGreedy(tok.eos_id)
    router = RuleRouter(tok)
    cache = DraftCache(tmp_path / "drafts.jsonl")
    drafter = Drafter(router, store, gen, bos_id=tok.bos_id, max_new_tokens=4, batch_size=3, cache=cache)
    prompts = [tok.encode(t[:30]) for t in CODE[:2] + LEGAL[:2]]
    sets = drafter.draft(prompts, progress=False)
    assert [[d.expert for d in s.drafts] for s in sets] == [["code"], ["code"], ["legal", "code"], ["legal", "code"]]
    assert sets[2].drafts[0].confidence == pytest.approx(0.6)
    assert gen.prompts == 6 and len(cache) == 6
    # the drafts are the experts' own greedy continuations of <|bos|> + prompt
    ref = CountingGreedy(tok.eos_id)(store.get("legal"), [[tok.bos_id, *prompts[2]]], 4)[0]
    assert list(sets[2].drafts[0].ids) == ref
    again = Drafter(router, store, gen, bos_id=tok.bos_id, max_new_tokens=4, cache=DraftCache(tmp_path / "drafts.jsonl"))
    sets2 = again.draft(prompts, progress=False)
    assert gen.prompts == 6  # nothing regenerated: every draft came from the file
    assert [s.drafts for s in sets2] == [s.drafts for s in sets]
    longer = Drafter(router, store, gen, bos_id=tok.bos_id, max_new_tokens=5, cache=DraftCache(tmp_path / "drafts.jsonl"))
    longer.draft(prompts[:1], progress=False)
    assert gen.prompts == 7  # different settings -> different key


def test_run_trains_saves_and_reloads(setup, tmp_path) -> None:
    root, tok, cfg, emb, store, corpus = setup
    model = summarizer_lm(cfg, emb)
    gen = CountingGreedy(tok.eos_id)
    drafter = Drafter(RuleRouter(tok), store, gen, bos_id=tok.bos_id, max_new_tokens=4)
    tc = dict(batch_size=4, warmup_steps=2, eval_every=0, save_every=0, progress=False, log_every=1)
    rcfg = SummarizerRecipeConfig(prompt_tokens=12, target_tokens=8, draft_tokens=4, max_len=64,
                                  adapter_targets=["in_proj"], adapter_rank=2,
                                  train=TrainConfig(max_steps=30, lr=1e-2, **tc),
                                  adapter_train=TrainConfig(max_steps=5, lr=1e-2, **tc))
    emb_before = emb.weight.detach().clone()
    report = run(model, corpus, tok, drafter, tmp_path / "run", rcfg, progress=False)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "train_summarizer" / "metrics.jsonl").read_text().splitlines()
              if json.loads(l).get("kind") == "train"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # fusion training lowers the answer loss
    assert torch.equal(emb.weight, emb_before)  # the shared table stayed frozen
    assert report["adapter_modules"] == ["blocks.0.mixer.in_proj"]
    for k in ("val_answer_ppl", "code_answer_ppl_base", "code_answer_ppl_adapter", "intent_val_accuracy"):
        assert report[k] is not None and report[k] == report[k]
    assert 0.0 <= report["intent_val_accuracy"] <= 1.0
    # artefacts reload: base summarizer (without its embedding) + adapter + intent head
    again = load_lm(tmp_path / "run" / "summarizer", "summarizer", embedding=emb).eval()
    assert adapter_names(again) == []
    load_adapter(again, tmp_path / "run" / "summarizer" / "adapters" / "code")
    model.eval()
    x = torch.tensor([tok.encode("def f(x):")])
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
    clf = IntentClassifier.load(tmp_path / "run" / "summarizer" / "intent")
    assert clf.labels == ["code", "other"]
    assert (tmp_path / "run" / "drafts.jsonl").is_file()
