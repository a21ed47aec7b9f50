"""Legal evaluation (``taskmoe eval legal MODEL``): LegalBench hearsay and rule_qa under the chat template.

- **hearsay** (:func:`eval_hearsay`): each item is a user turn holding the task prompt
  (``base_prompt.txt`` with ``{{text}}`` filled in and its final ``A:`` dropped: the assistant
  turn answers) and is classified by ``log p("Yes")`` vs ``log p("No")`` as the assistant's reply
  (:mod:`taskmoe.eval.scoring`). Two prompts: **few-shot** (the task's prompt with its five
  examples) and **zero-shot** (its first paragraph, the definition, then the question). Both
  **raw** (argmax over the two labels) and **calibrated** against content-free inputs ("N/A",
  "", "[MASK]" in place of the item, :func:`taskmoe.eval.classify.calibrate`). Metric: balanced
  accuracy with a 95% bootstrap interval (:mod:`taskmoe.eval.classify`). The few-shot prefix
  shared by every item (template header, definition, examples) is prefilled once and its state
  cloned per item (:class:`~taskmoe.eval.scoring.PrefixCache`).
- **rule_qa** (:func:`eval_rule_qa`): the question as the user turn, the reference answer as the
  assistant reply; the mean log-likelihood per answer token (token-weighted over all questions,
  and the mean of per-question means), plus greedy answers to the first ``generate`` questions.

- **legal text** (optional, :func:`legal_perplexity`): perplexity of held-out raw legal text, the
  validation split of a legal corpus source (``--legal-text legal:DIR``, split as ``taskmoe cohesion``
  splits it), in full windows of ``max_len`` tokens, next-token loss on every position.
- **chat quality** (optional, :mod:`taskmoe.eval.chat_quality`): held-out Alpaca reference-answer
  log-likelihood per token and hh-rlhf preference accuracy, on the examples the trainers held out.

MODEL is a model folder, a backbone folder, or the output folder of ``train sft`` / ``train dpo``
(``OUT/adapter`` on its base model, or ``OUT/model``); ``--adapter DIR`` adds a LoRA adapter.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from taskmoe.data.chat import prompt_ids
from taskmoe.data.formats import read_alpaca, read_preferences
from taskmoe.data.sft import split_examples
from taskmoe.errors import DataError
from taskmoe.eval.chat_quality import preference_accuracy, reference_loglik
from taskmoe.eval.classify import calibrate, classification_report, label_probs
from taskmoe.eval.nll import batched, corpus_nll, perplexity, picked_nll
from taskmoe.eval.scoring import PrefixCache, common_prefix_len
from taskmoe.inference.generate import GenerationConfig, generate as run_generate
from taskmoe.io import atomic_write_json, load_component
from taskmoe.layers.lora import load_adapter, set_adapter
from taskmoe.models.folder import load_model_folder
from taskmoe.progress import progress_bar

LABELS = ("Yes", "No")
CONTENT_FREE = ("N/A", "", "[MASK]")
LEGALBENCH = Path("data") / "legal_qa" / "legalbench"


# ------------------------------------------------------------------------------ task files
def read_tsv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a LegalBench TSV; DataError naming the file when a column is missing."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        raise DataError(f"{path}: needs columns {list(columns)} (missing {missing or 'all rows'})")
    return rows


def hearsay_templates(base_prompt: str) -> tuple[str, str]:
    """``(few_shot, zero_shot)`` user-turn templates from ``base_prompt.txt`` (final ``A:`` dropped)."""
    text = base_prompt.strip()
    if "{{text}}" not in text:
        raise DataError("hearsay base_prompt.txt has no {{text}} slot")
    if text.endswith("A:"):
        text = text[:-2].rstrip()
    blocks = text.split("\n\n")
    zero = "\n\n".join([blocks[0], blocks[-1]]) if len(blocks) > 2 and not blocks[0].startswith("Q:") else blocks[-1]
    return text, zero


def resolve_legalbench(data: Optional[Path]) -> Path:
    """``data``, else ``$TASKMOE_SHARED/data/legal_qa/legalbench``, else ``../shared/...`` (first that exists)."""
    env = os.environ.get("TASKMOE_SHARED")
    tried = [Path(data)] if data is not None else (
        ([Path(env) / LEGALBENCH] if env else []) + [Path("..") / "shared" / LEGALBENCH, Path("shared") / LEGALBENCH])
    for p in tried:
        if (p / "hearsay").is_dir():
            return p
    raise DataError(f"LegalBench tasks not found (looked at {[str(p) for p in tried]}); pass --data DIR holding "
                    "hearsay/ and rule_qa/")


def load_eval_model(model: Path, adapter: Optional[Path] = None) -> tuple[nn.Module, Any]:
    """Model + tokenizer from a model/backbone folder or a ``train sft|dpo`` output folder (module docstring)."""
    model = Path(model)
    if not (model / "config.json").is_file():
        if (model / "adapter" / "config.json").is_file():
            adapter = adapter or model / "adapter"
            base = load_component(model / "adapter").meta.get("base_model")
            if not base:
                raise DataError(f"{model / 'adapter' / 'config.json'}: no meta.base_model; pass the base MODEL and --adapter")
            model = Path(base)
        elif (model / "model" / "config.json").is_file():
            model = model / "model"
    m, tok = load_model_folder(model)
    if adapter is not None:
        set_adapter(m, load_adapter(m, adapter))
    return m.eval(), tok


# --------------------------------------------------------------------------------- hearsay
def _user(tok: Any, content: str) -> list[int]:
    return prompt_ids(tok, [{"role": "user", "content": content}])


def label_scores(model: nn.Module, tok: Any, contents: Sequence[str], *, progress: bool = False) -> torch.Tensor:
    """``(N, 2)`` log-probabilities of the replies "Yes" / "No" to each user turn, prefix-cached."""
    prompts = [_user(tok, c) for c in contents]
    labels = [tok.encode(lab, allow_special=False) for lab in LABELS]
    n = max(1, min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1))
    cache = PrefixCache(model, prompts[0][:n])
    rows = []
    with progress_bar(progress) as bar:
        task = bar.add_task("hearsay", total=len(prompts))
        for p in prompts:
            rows.append(cache.score_prompt(p, labels))
            bar.advance(task)
    return torch.tensor(rows, dtype=torch.float64)


def spread(items: Sequence[Any], n: Optional[int]) -> list[Any]:
    """``n`` items evenly spaced over ``items`` (all when ``n`` is None): ``items[floor(i * N / n)]``.

    LegalBench's test files are sorted by label (hearsay: every "No" first), so the first ``n`` items
    would hold one class only and make balanced accuracy meaningless.
    """
    N = len(items)
    if n is None or n >= N:
        return list(items)
    return [items[(i * N) // n] for i in range(max(0, n))]


def eval_hearsay(model: nn.Module, tok: Any, task_dir: Path, *, max_items: Optional[int] = None, n_boot: int = 1000,
                 progress: bool = False) -> dict[str, Any]:
    """Balanced accuracy (raw and calibrated, few- and zero-shot) on ``task_dir/test.tsv``."""
    items = spread(read_tsv(task_dir / "test.tsv", ("label", "text")), max_items)
    gold = [LABELS.index(r["label"].strip()) for r in items]
    few, zero = hearsay_templates((task_dir / "base_prompt.txt").read_text(encoding="utf-8"))
    out: dict[str, Any] = {"items": len(items), "yes_share_gold": gold.count(0) / len(gold)}
    for name, template in (("few_shot", few), ("zero_shot", zero)):
        fill = lambda t: template.replace("{{text}}", t)  # noqa: E731
        t0 = time.perf_counter()
        scores = label_scores(model, tok, [fill(r["text"].strip()) for r in items], progress=progress)
        content_free = label_scores(model, tok, [fill(cf) for cf in CONTENT_FREE])
        out[name] = {"raw": classification_report(label_probs(scores), gold, LABELS, n_boot=n_boot),
                     "calibrated": classification_report(calibrate(scores, content_free), gold, LABELS, n_boot=n_boot),
                     "seconds": time.perf_counter() - t0}
    return out


# --------------------------------------------------------------------------------- rule_qa
@torch.inference_mode()
def answer_logprob(model: nn.Module, tok: Any, question: str, answer: str) -> tuple[float, int]:
    """``(sum log p(answer tokens | question in chat form), #answer tokens)``."""
    prompt = _user(tok, question)
    ans = tok.encode(answer, allow_special=False)
    ids = torch.tensor([prompt + ans], device=next(model.parameters()).device)  # (1, P + A)
    logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)  # (A, V)
    picked = logp.gather(-1, ids[0, len(prompt):, None]).squeeze(-1)  # (A,)
    nll, n = picked_nll(picked[None], torch.ones_like(picked[None], dtype=torch.bool))
    return -float(nll[0]), int(n[0])


def eval_rule_qa(model: nn.Module, tok: Any, task_dir: Path, *, max_items: Optional[int] = None, generate: int = 5,
                 max_new_tokens: int = 48, progress: bool = False) -> dict[str, Any]:
    """Mean log-likelihood per token of the reference answers, and greedy answers to the first ``generate``."""
    rows = read_tsv(task_dir / "test.tsv", ("text", "answer"))[:max_items]
    total, tokens, per_q = 0.0, 0, []
    with progress_bar(progress) as bar:
        task = bar.add_task("rule_qa", total=len(rows))
        for r in rows:
            lp, n = answer_logprob(model, tok, r["text"].strip(), r["answer"].strip())
            total, tokens = total + lp, tokens + n
            per_q.append(lp / max(1, n))
            bar.advance(task)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=[tok.eos_id])
    asked = rows[:generate]
    outs = run_generate(model, [_user(tok, r["text"].strip()) for r in asked], cfg) if asked else []
    return {"questions": len(rows), "answer_tokens": tokens, "mean_ll_per_token": total / max(1, tokens),
            "mean_of_question_means": sum(per_q) / max(1, len(per_q)),
            "answers": [{"question": r["text"].strip(), "reference": r["answer"].strip(),
                         "generated": tok.decode(o, skip_special=True).strip()} for r, o in zip(asked, outs)]}


@torch.no_grad()
def legal_perplexity(model: nn.Module, windows: Any, batch_size: int = 4) -> dict[str, float]:
    """``exp(sum NLL / #tokens)`` over held-out legal windows (a :class:`~taskmoe.data.text_windows.TextWindows`;
    next-token loss on every position). The windows are full (one length), so they batch without padding."""
    dev = next(model.parameters()).device
    nll = corpus_nll(lambda b: (model(b["input_ids"].to(dev)).logits, b["labels"].to(dev)),
                     batched(windows, batch_size, windows.collate), model=model)
    return {"windows": len(windows), "tokens": nll.tokens, "ppl": perplexity(nll.mean), "mean_nll": nll.mean}


def held_out_legal_windows(source: str, tok: Any, max_len: int, max_windows: Optional[int]) -> Any:
    """The first ``max_windows`` full ``max_len``-token windows of the validation split of corpus ``source``."""
    from taskmoe.data.commands import get_corpus
    from taskmoe.data.text_windows import TextWindows

    held = list(get_corpus(source, progress=False).validation)
    if not held:
        raise DataError(f"--legal-text {source}: the corpus has no validation documents to hold out")
    return TextWindows(held, tok, max_len, full_only=True, max_windows=max_windows)


# ------------------------------------------------------------------------------------- CLI
def eval_legal(
    model: Path,
    adapter: Optional[Path] = None,
    data: Optional[Path] = None,
    max_items: Optional[int] = None,
    generate: int = 5,
    bootstrap: int = 1000,
    alpaca: Optional[Path] = None,
    preferences: Optional[Path] = None,
    legal_text: Optional[str] = None,
    legal_windows: int = 24,
    held_out: int = 64,
    seed: int = 0,
    max_len: int = 512,
    out: Optional[Path] = None,
    threads: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate MODEL on LegalBench hearsay (balanced accuracy, raw and calibrated, few- and zero-shot, 95% CI)
    and rule_qa (reference-answer log-likelihood per token; greedy answers to the first --generate questions).

    MODEL: a model folder, a backbone folder, or a `train sft|dpo` output folder; --adapter DIR adds a
    LoRA adapter. --data: the LegalBench folder holding hearsay/ and rule_qa/ (default: the shared
    data folder). --out FILE writes the report as JSON. The few-shot prompt's shared prefix is
    prefilled once and its decoding state cloned per item. --alpaca FILE / --preferences FILE add the
    held-out reference-answer log-likelihood and preference accuracy (chosen more likely than
    rejected) on the --held-out N examples that `train sft|dpo` with the same --seed held out.
    --legal-text SOURCE (e.g. legal:../shared/data/legal_raw) adds the perplexity of held-out raw legal
    text: the first --legal-windows full windows of --max-len tokens of that corpus's validation split
    (the legal expert of `taskmoe cohesion` never trains on it).
    """
    if threads:
        torch.set_num_threads(threads)
    root = resolve_legalbench(data)
    t0 = time.perf_counter()
    m, tok = load_eval_model(model, adapter)
    report: dict[str, Any] = {"model": str(model), "adapter": str(adapter) if adapter else None, "data": str(root)}
    report["hearsay"] = eval_hearsay(m, tok, root / "hearsay", max_items=max_items, n_boot=bootstrap, progress=progress)
    report["rule_qa"] = eval_rule_qa(m, tok, root / "rule_qa", max_items=max_items, generate=generate, progress=progress)
    if alpaca is not None:
        _, held = split_examples(read_alpaca(alpaca), held_out, seed)
        report["alpaca"] = reference_loglik(m, tok, held, max_len=max_len)
    if preferences is not None:
        _, held = split_examples(read_preferences(preferences), held_out, seed)
        report["preferences"] = preference_accuracy(m, tok, held, max_len=max_len)
    if legal_text is not None:
        report["legal_text"] = {"source": legal_text, **legal_perplexity(
            m, held_out_legal_windows(legal_text, tok, max_len, legal_windows))}
    report["seconds"] = time.perf_counter() - t0
    if out is not None:
        atomic_write_json(out, report)
    return report
