"""Does the IMoE summarizer earn its place? Held-out measurements of a loaded system.

Everything here scores a :class:`~taskmoe.inference.pipeline.System` on held-out fusion pairs
(:func:`taskmoe.summarizer.examples.fusion_pairs`: prompt -> true continuation / reply) and is
shared by the quickstart report, ``taskmoe train summarizer`` (threshold calibration) and
``bench/fusion.py``:

- :func:`fusion_perplexity`: perplexity of the *true target* under
  (a) the summarizer reading the prompt and the selected experts' drafts, as deployed (coding
  adapter on coding intent), (b) the summarizer with no drafts, (c) the top-1 selected expert
  continuing ``<|bos|> prompt``, (d) the best selected expert *per example* (an oracle that
  knows the answer; the strongest single-expert baseline). Same target tokens for all, so the
  numbers are comparable; ``PPL = exp(sum NLL / tokens)`` per domain and overall.
- :func:`adapter_eval`: code-domain target perplexity under the summarizer with and without the
  coding adapter (drafts included), and the intent head's accuracy (code vs other).
- :func:`disagreement_examples` / :func:`calibrate_disagreement`: every held-out prompt is
  drafted by its most confident expert; a *natural agreement* pairs that draft with the draft
  of another prompt of the same domain, a *planted conflict* with the draft of a prompt from
  an unrelated domain (drafts taken from unrelated domains, as the seed's "experts disagree"
  case). Scores are :meth:`System.assess` disagreement scores (router-encoder similarity +
  intent consistency with the prompt); the threshold with the best F1
  (:func:`taskmoe.summarizer.disagreement.calibrate_threshold`) and its precision/recall are
  reported. (Pairing a prompt's two most confident experts instead measures little once the
  router is sharp: the runner-up is an off-domain expert with near-zero confidence.)
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from taskmoe.errors import DataError
from taskmoe.eval.nll import IGNORE_INDEX, evaluating, perplexity, row_nll
from taskmoe.summarizer.disagreement import calibrate_threshold, precision_recall
from taskmoe.summarizer.examples import FusionPair, fusion_pairs
from taskmoe.summarizer.fuser import Draft
from taskmoe.summarizer.switch import summarizer_adapter

__all__ = ["heldout_pairs", "target_nll", "fusion_perplexity", "adapter_eval", "disagreement_examples",
           "calibrate_disagreement"]

ALL = "all"


def heldout_pairs(docs: Sequence[Any], tokenizer: Any, *, prompt_tokens: int = 64, target_tokens: int = 48,
                  per_domain: int | None = None) -> list[FusionPair]:
    """Fusion pairs of held-out documents, at most ``per_domain`` per domain (the first ones, in order)."""
    pairs = fusion_pairs(docs, tokenizer, prompt_tokens=prompt_tokens, target_tokens=target_tokens)
    if per_domain is not None:
        seen: dict[str | None, int] = defaultdict(int)
        kept = []
        for p in pairs:
            if seen[p.domain] < per_domain:
                seen[p.domain] += 1
                kept.append(p)
        pairs = kept
    if not pairs:
        raise DataError("no held-out fusion pairs (empty split or every document too short)")
    return pairs


def target_nll(model: nn.Module, seqs: Sequence[tuple[Sequence[int], int, int]], *, pad_id: int, batch_size: int = 16,
               adapter: str | None = None, adapter_rows: Sequence[bool] | None = None) -> list[float]:
    """Summed NLL of ``ids[start : start + n]`` for each ``(ids, start, n)``, one full forward per batch.

    Batches are right-padded (a causal model's scored positions never see the padding).
    ``adapter`` with ``adapter_rows`` runs that LoRA adapter on exactly those rows.
    """
    out: list[float] = []
    with evaluating(model):
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            T = max(len(ids) for ids, _, _ in chunk)
            x = torch.full((len(chunk), T), int(pad_id), dtype=torch.long)
            y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)  # logits at t predict token t + 1
            for b, (ids, start, n) in enumerate(chunk):
                x[b, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
                y[b, start - 1 : start - 1 + n] = torch.tensor(list(ids[start : start + n]), dtype=torch.long)
            name, rows = adapter, None
            if adapter is not None and adapter_rows is not None:
                rows = torch.tensor([bool(r) for r in adapter_rows[s : s + batch_size]])
                if not bool(rows.any()):
                    name, rows = None, None
            with summarizer_adapter(model, name, rows):
                nll, _ = row_nll(model(x).logits, y)  # (B,)
            out.extend(nll.tolist())
    return out


def _ppl_rows(columns: dict[str, list[float]], tokens: list[int], domains: list[str | None]) -> list[dict[str, Any]]:
    rows = []
    names = sorted({str(d) for d in domains})
    for dom in names + [ALL]:
        idx = [i for i, d in enumerate(domains) if dom == ALL or str(d) == dom]
        n_tok = sum(tokens[i] for i in idx)
        row: dict[str, Any] = {"domain": dom, "examples": len(idx), "tokens": n_tok}
        for name, nll in columns.items():
            row[name] = perplexity(sum(nll[i] for i in idx) / max(n_tok, 1))
        rows.append(row)
    return rows


def _adapter_flags(system: Any, prompts: list[list[int]]) -> list[bool]:
    return [system.uses_adapter(r) for r in system.detect_intent(prompts)]


@torch.no_grad()
def fusion_perplexity(system: Any, pairs: Sequence[FusionPair], *, batch_size: int = 16) -> list[dict[str, Any]]:
    """Per domain and overall: target perplexity under the summarizer (with / without drafts) and
    under the top-1 and the best selected expert (module docstring)."""
    if system.summarizer is None or system.fmt is None:
        raise DataError("fusion_perplexity needs a system with a summarizer")
    tok, fmt, summ = system.tokenizer, system.fmt, system.summarizer
    prompts = [list(p.prompt) for p in pairs]
    decisions = system.router.route_batch(prompts)
    drafts = system.draft(prompts, decisions)
    flags = _adapter_flags(system, prompts)
    adapter = system.config.adapter if any(flags) else None
    with_d, without_d = [], []
    for p, d in zip(pairs, drafts):
        seq = fmt.build(p.prompt, d, p.target)
        with_d.append((seq.ids, seq.answer_start, len(p.target)))
        bare = fmt.build(p.prompt, [], p.target)
        without_d.append((bare.ids, bare.answer_start, len(p.target)))
    cols = {
        "summarizer": target_nll(summ, with_d, pad_id=tok.pad_id, batch_size=batch_size, adapter=adapter, adapter_rows=flags),
        "summarizer_no_drafts": target_nll(summ, without_d, pad_id=tok.pad_id, batch_size=batch_size, adapter=adapter,
                                           adapter_rows=flags),
    }
    per_expert: dict[int, dict[str, float]] = defaultdict(dict)
    by_expert: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(decisions):
        for c in d.selected_names:
            by_expert[system.expert_of[c]].append(i)
    for name in sorted(by_expert):
        rows = by_expert[name]
        seqs = [([tok.bos_id, *pairs[i].prompt, *pairs[i].target], 1 + len(pairs[i].prompt), len(pairs[i].target)) for i in rows]
        for i, v in zip(rows, target_nll(system.store.get(name), seqs, pad_id=tok.pad_id, batch_size=batch_size)):
            per_expert[i][name] = v
    cols["top1_expert"] = [per_expert[i][system.expert_of[d.selected_names[0]]] for i, d in enumerate(decisions)]
    cols["best_selected_expert"] = [min(per_expert[i].values()) for i in range(len(pairs))]
    return _ppl_rows(cols, [len(p.target) for p in pairs], [p.domain for p in pairs])


@torch.no_grad()
def adapter_eval(system: Any, pairs: Sequence[FusionPair], *, code_domain: str = "code", batch_size: int = 16) -> dict[str, Any]:
    """Code-domain target perplexity with / without the coding adapter; intent accuracy on all pairs."""
    if system.summarizer is None or system.fmt is None:
        raise DataError("adapter_eval needs a system with a summarizer")
    tok, fmt = system.tokenizer, system.fmt
    prompts = [list(p.prompt) for p in pairs]
    intents = system.detect_intent(prompts)
    out: dict[str, Any] = {}
    if intents[0] is not None:
        want = ["code" if p.domain == code_domain else "other" for p in pairs]
        got = [r.label for r in intents]  # type: ignore[union-attr]
        out["intent_accuracy"] = float(np.mean([a == b for a, b in zip(got, want)]))
        out["intent_code_recall"] = _rate(got, want, "code")
        out["intent_examples"] = len(pairs)
    code = [p for p in pairs if p.domain == code_domain]
    name = system.config.adapter
    if code and name in system.adapters:
        cp = [list(p.prompt) for p in code]
        drafts = system.draft(cp)
        seqs = []
        for p, d in zip(code, drafts):
            s = fmt.build(p.prompt, d, p.target)
            seqs.append((s.ids, s.answer_start, len(p.target)))
        n_tok = sum(len(p.target) for p in code)
        base = target_nll(system.summarizer, seqs, pad_id=tok.pad_id, batch_size=batch_size)
        ad = target_nll(system.summarizer, seqs, pad_id=tok.pad_id, batch_size=batch_size, adapter=name,
                        adapter_rows=[True] * len(seqs))
        out.update({"code_examples": len(code), "code_tokens": n_tok, "code_ppl_without_adapter": perplexity(sum(base) / n_tok),
                    "code_ppl_with_adapter": perplexity(sum(ad) / n_tok)})
    return out


def _rate(got: list[str], want: list[str], label: str) -> float | None:
    idx = [i for i, w in enumerate(want) if w == label]
    return float(np.mean([got[i] == label for i in idx])) if idx else None


@torch.no_grad()
def disagreement_examples(system: Any, pairs: Sequence[FusionPair], *, seed: int = 0) -> list[dict[str, Any]]:
    """Natural and planted two-draft examples with their disagreement scores (module docstring).

    Every prompt is drafted by its most confident expert. For prompt ``i`` (whose intent the
    assessment compares with), a *natural* example pairs its draft with the draft of another
    prompt of the **same** domain (a different document), a *planted conflict* with the draft of
    a prompt of **another** domain; the partner is drawn with a seeded generator. The two kinds
    differ only in whether the second draft comes from the same domain, so the score's ability
    to tell them apart is what is measured.
    """
    prompts = [list(p.prompt) for p in pairs]
    decisions = []
    for d in system.router.route_batch(prompts):
        top = int(np.argmax(d.confidences))
        decisions.append(dataclasses.replace(d, selected=[top], weights=[1.0]))
    drafts = [ds[0] if ds else None for ds in system.draft(prompts, decisions)]
    rng = np.random.default_rng(seed)
    out = []
    for i, p in enumerate(pairs):
        if p.domain is None or drafts[i] is None:
            continue
        same = [j for j, q in enumerate(pairs) if q.domain == p.domain and q.doc_id != p.doc_id and drafts[j] is not None]
        other = [j for j, q in enumerate(pairs) if q.domain is not None and q.domain != p.domain and drafts[j] is not None]
        if not same or not other:
            continue
        for conflict, pool in ((False, same), (True, other)):
            j = int(pool[int(rng.integers(len(pool)))])
            partner = drafts[j]
            assert partner is not None and drafts[i] is not None
            rep = system.assess(p.prompt, [drafts[i], partner])
            out.append({"score": rep.score, "conflict": conflict, "domain": p.domain, "other_domain": pairs[j].domain,
                        "experts": [drafts[i].expert, partner.expert]})
    if not out:
        raise DataError("disagreement examples need held-out prompts from at least two labelled domains, "
                        "with two documents in a domain")
    return out


def calibrate_disagreement(system: Any, pairs: Sequence[FusionPair], *, seed: int = 0,
                           threshold: float | None = None) -> dict[str, Any]:
    """The best-F1 threshold on natural vs planted examples (or P/R at a given ``threshold``)."""
    ex = disagreement_examples(system, pairs, seed=seed)
    scores = [e["score"] for e in ex]
    labels = [e["conflict"] for e in ex]
    if threshold is None:
        best = calibrate_threshold(scores, labels)
    else:
        p, r = precision_recall(scores, labels, threshold)
        best = {"threshold": float(threshold), "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
    nat = [s for s, c in zip(scores, labels) if not c]
    pl = [s for s, c in zip(scores, labels) if c]
    best.update({"natural": len(nat), "planted": len(pl), "natural_mean_score": float(np.mean(nat)),
                 "planted_mean_score": float(np.mean(pl))})
    return best
