"""Log-probabilities of continuations, with the shared prompt prefix prefilled once (prefix caching).

A few-shot classification prompt is the same long prefix (instruction + examples) followed by a
short item-specific suffix, scored against each label. :class:`PrefixCache` runs the prefix
through the model once with an explicit decoding state (the one LM interface:
``model(ids, state) -> LMOutput(logits, state)``), and for every item **clones** that state,
feeds the suffix, and scores each continuation from a further clone. Cost per item: the suffix
and the label tokens instead of the whole prompt. :func:`continuation_logprobs` is the uncached
twin (one full forward per continuation), used as the reference in tests.

Definition: for context ``x`` and continuation ``c = (c_1..c_k)``,
``log p(c | x) = sum_j log softmax(z_{|x| + j - 1})[c_j]`` where ``z_t`` are the logits after
token ``t`` of ``x + c``.

Design choices: a state must be cloned before it is fed, because a KV cache step writes into its
buffer in place (:mod:`taskmoe.layers.attention`); everything runs under ``inference_mode`` in
float32 on one row at a time (prompts are ragged; the prefix is what costs).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["PrefixCache", "continuation_logprobs", "common_prefix_len"]


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def continuation_logprobs(model: nn.Module, context: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
    """``log p(c | context)`` for each continuation by one full forward each (no cache)."""
    dev = next(model.parameters()).device
    out = []
    for c in continuations:
        ids = torch.tensor([list(context) + list(c)], device=dev)  # (1, |x| + k)
        lp = _logp(model(ids).logits[0])  # (|x| + k, V)
        pos = torch.arange(len(context) - 1, len(context) + len(c) - 1, device=dev)
        out.append(float(lp[pos, torch.tensor(list(c), device=dev)].sum()))
    return out


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all ``rows`` share."""
    if not rows:
        return 0
    n = min(len(r) for r in rows)
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


class PrefixCache:
    """The state after a shared ``prefix`` (prefilled once) and continuation scoring from its clones."""

    def __init__(self, model: nn.Module, prefix: Sequence[int]) -> None:
        if not prefix:
            raise ValueError("PrefixCache needs a non-empty prefix")
        self.model, self.prefix = model, list(prefix)
        self.device = next(model.parameters()).device
        with torch.inference_mode():
            out = model(self._ids(self.prefix), model.init_state(1), logits_to_keep=1)
        self.state, self.last = out.state, out.logits[0, -1]  # state after the prefix, (V,)

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(ids)], device=self.device)  # (1, T)

    @torch.inference_mode()
    def score(self, suffix: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """``log p(c | prefix + suffix)`` for each continuation ``c`` (equal to the uncached value)."""
        state, last = self.state, self.last
        if suffix:
            out = self.model(self._ids(suffix), state.clone(), logits_to_keep=1)
            state, last = out.state, out.logits[0, -1]
        first = _logp(last)  # (V,)
        scores = []
        for c in continuations:
            s = float(first[c[0]])
            if len(c) > 1:
                lp = _logp(self.model(self._ids(c[:-1]), state.clone()).logits[0])  # (k - 1, V)
                s += float(lp[torch.arange(len(c) - 1, device=self.device), torch.tensor(list(c[1:]), device=self.device)].sum())
            scores.append(s)
        return scores

    def score_prompt(self, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Score continuations of a full ``prompt`` that starts with this cache's prefix."""
        n = len(self.prefix)
        if list(prompt[:n]) != self.prefix:
            raise ValueError("prompt does not start with the cached prefix")
        return self.score(prompt[n:], continuations)
