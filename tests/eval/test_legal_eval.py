"""Legal evaluation: prefix-cached scores equal uncached ones, calibration and balanced accuracy by hand,
and ``eval_legal`` end to end on a tiny model (synthetic LegalBench-shaped files; the real ones when shared)."""

from __future__ import annotations

import pytest
import torch

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.eval.classify import balanced_accuracy, bootstrap_ci, calibrate, label_probs
from taskmoe.eval.legal import CONTENT_FREE, answer_logprob, eval_legal, hearsay_templates
from taskmoe.eval.scoring import PrefixCache, common_prefix_len, continuation_logprobs
from taskmoe.models import LMConfig, expert_lm, transformer_lm
from taskmoe.models.checkpoint import save_lm

PROMPT = ("Hearsay is a statement made out of court.\n\nQ: A fact about Ann. Is there hearsay?\nA: No\n\n"
          "Q: Bob told Carl he was ill. Is there hearsay?\nA: Yes\n\nQ: {{text}} Is there hearsay?\nA:")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([PROMPT, "Yes No maybe the court said a rule of law"] * 5, 300, show_progress=False)


@pytest.mark.parametrize("build", [transformer_lm, expert_lm])  # KV cache, and recurrent/conv states
def test_prefix_cache_scores_equal_full_forwards(tok, build):
    torch.manual_seed(0)
    model = build(LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2)).eval()
    prompts = [tok.encode(PROMPT.replace("{{text}}", t)) for t in ("Dan ran.", "Eve wrote a letter to Fay.")]
    n = common_prefix_len(prompts)
    assert 0 < n < min(map(len, prompts))
    cache = PrefixCache(model, prompts[0][:n])
    conts = [tok.encode(" Yes"), tok.encode(" No maybe"), [5]]
    for p in prompts:  # the cache is reused: its state must not be consumed by an item
        got, want = cache.score_prompt(p, conts), continuation_logprobs(model, p, conts)
        assert got == pytest.approx(want, abs=1e-4)


def test_calibration_and_balanced_accuracy_by_hand():
    """Scores always favour label 0 (p = (0.8, 0.2) and (0.6, 0.4)); the content-free mean is (0.7, 0.3).
    Calibrated: (0.8/0.7, 0.2/0.3) -> normalised (0.6316, 0.3684) and (0.6/0.7, 0.4/0.3) -> (0.3913, 0.6087):
    the second item flips to label 1. Raw predictions (0, 0) on gold (0, 1): balanced accuracy 1/2; calibrated 1."""
    s = torch.tensor([[0.8, 0.2], [0.6, 0.4]]).log()
    cf = torch.tensor([[0.7, 0.3]]).log()
    q = calibrate(s, cf)
    assert q[0].tolist() == pytest.approx([0.8 / 0.7 / (0.8 / 0.7 + 0.2 / 0.3), 0.2 / 0.3 / (0.8 / 0.7 + 0.2 / 0.3)])
    assert q.argmax(-1).tolist() == [0, 1]
    assert balanced_accuracy(label_probs(s).argmax(-1).tolist(), [0, 1]) == 0.5
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx((1 + 0.5) / 2)
    lo, hi = bootstrap_ci([0, 0, 0, 1] * 10, [0, 0, 1, 1] * 10, n=200)
    assert lo <= 0.75 <= hi and (lo, hi) == bootstrap_ci([0, 0, 0, 1] * 10, [0, 0, 1, 1] * 10, n=200)
    assert bootstrap_ci([0] * 20, [0, 1] * 10, n=100) == (0.5, 0.5)  # constant predictions: exactly chance


def test_hearsay_templates_drop_the_final_answer_slot():
    few, zero = hearsay_templates(PROMPT)
    assert few.endswith("{{text}} Is there hearsay?") and "Bob told Carl" in few
    assert zero == "Hearsay is a statement made out of court.\n\nQ: {{text}} Is there hearsay?"


def _legalbench(root):
    (root / "hearsay").mkdir(parents=True)
    (root / "rule_qa").mkdir()
    (root / "hearsay" / "base_prompt.txt").write_text(PROMPT)
    rows = [("Yes", "Gil said the car was red."), ("No", "Hal ran fast."), ("No", "Ivy smiled."), ("Yes", "Jo wrote it.")]
    (root / "hearsay" / "test.tsv").write_text("label\ttext\tslice\n" + "".join(f"{a}\t{b}\tx\n" for a, b in rows))
    qa = [("What is a rule of law?", "A rule the court said."), ("Where is the rule?", "Rule 23")]
    (root / "rule_qa" / "test.tsv").write_text("text\tanswer\tdoctrine\n" + "".join(f"{a}\t{b}\tCivil\n" for a, b in qa))
    return root


def _saved_tiny_model(folder, tok):
    torch.manual_seed(0)
    model = transformer_lm(LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2))
    save_lm(model, folder)
    tok.save(folder)
    return model


def test_eval_legal_end_to_end_on_a_tiny_model(tmp_path, tok):
    model = _saved_tiny_model(tmp_path / "m", tok)
    rep = eval_legal(tmp_path / "m", data=_legalbench(tmp_path / "lb"), generate=1, bootstrap=50,
                     out=tmp_path / "rep.json", progress=False)
    h = rep["hearsay"]
    assert h["items"] == 4 and h["yes_share_gold"] == 0.5
    for shot in ("few_shot", "zero_shot"):
        for kind in ("raw", "calibrated"):
            r = h[shot][kind]
            assert 0 <= r["balanced_accuracy"] <= 1 and r["ci95"][0] <= r["balanced_accuracy"] <= r["ci95"][1]
            assert sum(r["predicted_share"].values()) == pytest.approx(1.0)
    q = rep["rule_qa"]
    lp = [answer_logprob(model.eval(), tok, a, b) for a, b in [("What is a rule of law?", "A rule the court said."),
                                                             ("Where is the rule?", "Rule 23")]]
    assert q["mean_ll_per_token"] == pytest.approx(sum(x for x, _ in lp) / sum(n for _, n in lp), abs=1e-6)
    assert q["answer_tokens"] == sum(n for _, n in lp) and len(q["answers"]) == 1
    assert (tmp_path / "rep.json").is_file() and len(CONTENT_FREE) == 3
    # answer_logprob is the sum of the answer tokens' log-probabilities after the chat prompt
    prompt = tok.encode_chat([{"role": "user", "content": "Where is the rule?"}])
    ans = tok.encode("Rule 23", allow_special=False)
    assert lp[1][0] == pytest.approx(continuation_logprobs(model, prompt, [ans])[0], abs=1e-5)


@pytest.mark.shared
def test_real_legalbench_files_parse(shared, tok):
    from taskmoe.eval.legal import read_tsv

    root = shared / "data" / "legal_qa" / "legalbench"
    items = read_tsv(root / "hearsay" / "test.tsv", ("label", "text"))
    # 95 rows (pandas.read_csv agrees; shared/data/README.md says 94)
    assert len(items) == 95 and {r["label"] for r in items} == {"Yes", "No"}
    few, zero = hearsay_templates((root / "hearsay" / "base_prompt.txt").read_text())
    assert few.count("Is there hearsay?") == 6 and zero.count("Is there hearsay?") == 1
    assert len(read_tsv(root / "rule_qa" / "test.tsv", ("text", "answer"))) == 50


def _law_folder(root):
    root.mkdir(parents=True)
    for i in range(40):
        body = " ".join(f"Rule {i}.{j}. The court shall hear the motion of a party and rule on it in writing."
                        for j in range(12))
        (root / f"rule_{i:02d}.md").write_text(f"# Rule {i}\n\n{body}\n", encoding="utf-8")
    return root


def test_eval_legal_adds_held_out_legal_text_perplexity(tmp_path, tok):
    from taskmoe.data.commands import get_corpus
    from taskmoe.data.text_windows import TextWindows
    from taskmoe.eval.legal import legal_perplexity

    model = _saved_tiny_model(tmp_path / "m", tok)
    source = f"legal:{_law_folder(tmp_path / 'law')}"
    rep = eval_legal(tmp_path / "m", data=_legalbench(tmp_path / "lb"), generate=0, bootstrap=20, legal_text=source,
                     legal_windows=3, max_len=32, progress=False)
    lt = rep["legal_text"]
    held = list(get_corpus(source, progress=False).validation)
    want = legal_perplexity(model.eval(), TextWindows(held, tok, 32, full_only=True, max_windows=3))
    assert lt["source"] == source and lt["windows"] == 3 and lt["tokens"] == 3 * 32
    assert lt["ppl"] == pytest.approx(want["ppl"], rel=1e-6) and lt["ppl"] > 1
