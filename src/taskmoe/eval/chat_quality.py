"""Held-out chat quality: reference-answer log-likelihood (Alpaca) and preference accuracy (hh-rlhf).

Both score completions under the chat template exactly as the SFT/DPO trainers see them
(:class:`~taskmoe.data.sft.SFTDataset`, :class:`~taskmoe.data.sft.PreferenceDataset`: labels
``-100`` except on the assistant tokens, content and end-of-turn):

- :func:`reference_loglik`: ``(1/N) sum log p(y_t | ...)`` over every assistant token of the held-out
  examples (token-weighted), i.e. minus the SFT loss, and its perplexity;
- :func:`preference_accuracy`: the share of pairs whose chosen completion is more likely than the
  rejected one, ``[log p(y_w | x) > log p(y_l | x)]`` (summed token log-probabilities, as DPO
  compares them), and the mean margin ``log p(y_w | x) - log p(y_l | x)``.

Batches are consecutive, padded on the right (padding never reaches a scored position of a
causal model); the model runs in eval mode under ``no_grad`` (:func:`~taskmoe.eval.nll.corpus_nll`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from taskmoe.data.formats import PreferenceExample, SFTExample
from taskmoe.data.sft import PreferenceDataset, SFTDataset
from taskmoe.eval.nll import batched, corpus_nll, evaluating, perplexity, row_nll

__all__ = ["reference_loglik", "preference_accuracy"]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def reference_loglik(model: nn.Module, tok: Any, examples: Sequence[SFTExample], *, max_len: int = 512,
                     batch_size: int = 8) -> dict[str, float]:
    """Mean log-likelihood per assistant token of ``examples`` (and its perplexity)."""
    ds = SFTDataset(examples, tok, max_len)
    dev = next(model.parameters()).device
    nll = corpus_nll(lambda b: (_logits(model, b["input_ids"].to(dev)), b["labels"].to(dev)),
                     batched(ds, batch_size, ds.collate), model=model)
    return {"examples": len(ds), "tokens": nll.tokens, "mean_ll_per_token": -nll.mean, "ppl": perplexity(nll.mean)}


def preference_accuracy(model: nn.Module, tok: Any, pairs: Sequence[PreferenceExample], *, max_len: int = 512,
                        batch_size: int = 8) -> dict[str, float]:
    """Share of pairs with ``log p(chosen) > log p(rejected)`` and the mean log-probability margin."""
    ds = PreferenceDataset(pairs, tok, max_len)
    dev = next(model.parameters()).device
    margins: list[float] = []
    with evaluating(model), torch.no_grad():
        for b in batched(ds, batch_size, ds.collate):
            ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]]).to(dev)  # (2B, T)
            labels = torch.cat([b["chosen_labels"], b["rejected_labels"]]).to(dev)  # (2B, T)
            nll, _ = row_nll(_logits(model, ids), labels)  # (2B,)
            w, lose = (-nll).chunk(2)
            margins += (w - lose).tolist()
    return {"pairs": len(margins), "accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_margin": sum(margins) / len(margins)}
