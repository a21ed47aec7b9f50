"""The five measures of the cohesion comparison (``bench/cohesion.py``), for any model of the one LM interface.

:func:`evaluate_row` runs, on one model: LegalBench hearsay (:func:`~taskmoe.eval.legal.eval_hearsay`:
balanced accuracy raw and calibrated, few- and zero-shot, bootstrap CI), rule_qa reference
log-likelihood per token and greedy answers (:func:`~taskmoe.eval.legal.eval_rule_qa`), held-out
legal perplexity (:func:`~taskmoe.eval.legal.legal_perplexity`), held-out Alpaca reference log-likelihood and hh-rlhf
preference accuracy (:mod:`taskmoe.eval.chat_quality`). The chat measures use batch size 1: a
per-sequence-routed model pools its prompt for routing, and padding would enter the pool. The
legal windows all have the same length (no padding), so they are batched.

:func:`imoe_rule_qa` is the IMoE comparison as a two-step pipeline over the same two experts: the
legal expert drafts an answer (greedy), then the chat expert answers with the draft in its prompt
(:func:`imoe_prompt`); the reference answer's log-likelihood is scored under that second prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from taskmoe.data.chat import prompt_ids
from taskmoe.data.text_windows import TextWindows
from taskmoe.eval.chat_quality import preference_accuracy, reference_loglik
from taskmoe.eval.legal import answer_logprob, eval_hearsay, eval_rule_qa, legal_perplexity, read_tsv
from taskmoe.inference.generate import GenerationConfig, generate as run_generate

__all__ = ["EvalData", "legal_perplexity", "evaluate_row", "imoe_prompt", "imoe_rule_qa"]


@dataclass
class EvalData:
    """What every row is evaluated on (each capped by the bench)."""

    legalbench: Path
    legal_windows: TextWindows
    alpaca: Sequence[Any]
    preferences: Sequence[Any]
    hearsay_items: Optional[int] = None
    rule_qa_items: Optional[int] = None
    max_len: int = 256
    generate: int = 5


def evaluate_row(model: nn.Module, tok: Any, data: EvalData, *, progress: bool = False) -> dict[str, Any]:
    """All five measures of one model (module docstring)."""
    model.eval()
    return {
        "hearsay": eval_hearsay(model, tok, data.legalbench / "hearsay", max_items=data.hearsay_items, progress=progress),
        "rule_qa": eval_rule_qa(model, tok, data.legalbench / "rule_qa", max_items=data.rule_qa_items,
                                generate=data.generate, progress=progress),
        "legal": legal_perplexity(model, data.legal_windows),
        "alpaca": reference_loglik(model, tok, data.alpaca, max_len=data.max_len, batch_size=1),
        "preferences": preference_accuracy(model, tok, data.preferences, max_len=data.max_len, batch_size=1),
    }


def imoe_prompt(question: str, draft: str) -> str:
    """The chat expert's user turn in the IMoE pipeline: the question, then the legal expert's draft."""
    return (f"{question}\n\nA legal expert's draft answer (it may be incomplete or wrong):\n{draft}\n\n"
            "Using the draft where it helps, answer the question clearly.")


def imoe_rule_qa(model: nn.Module, tok: Any, data: EvalData, use_drafter: Callable[[], None],
                 use_answerer: Callable[[], None], *, max_new_tokens: int = 48) -> dict[str, Any]:
    """rule_qa through the IMoE pipeline: drafts by the legal expert, answers and scoring by the chat expert."""
    rows = read_tsv(data.legalbench / "rule_qa" / "test.tsv", ("text", "answer"))[: data.rule_qa_items]
    user = lambda c: prompt_ids(tok, [{"role": "user", "content": c}])  # noqa: E731
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=[tok.eos_id])
    model.eval()
    use_drafter()
    drafts = [tok.decode(o, skip_special=True).strip()
              for o in run_generate(model, [user(r["text"].strip()) for r in rows], cfg)]
    use_answerer()
    total, tokens, per_q = 0.0, 0, []
    for r, d in zip(rows, drafts):
        lp, n = answer_logprob(model, tok, imoe_prompt(r["text"].strip(), d), r["answer"].strip())
        total, tokens = total + lp, tokens + n
        per_q.append(lp / max(1, n))
    asked = list(zip(rows, drafts))[: data.generate]
    outs = run_generate(model, [user(imoe_prompt(r["text"].strip(), d)) for r, d in asked], cfg) if asked else []
    return {"questions": len(rows), "answer_tokens": tokens, "mean_ll_per_token": total / max(1, tokens),
            "mean_of_question_means": sum(per_q) / max(1, len(per_q)),
            "answers": [{"question": r["text"].strip(), "reference": r["answer"].strip(), "draft": d,
                         "generated": tok.decode(o, skip_special=True).strip()} for (r, d), o in zip(asked, outs)]}
