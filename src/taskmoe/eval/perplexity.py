"""Held-out perplexity of language models, of experts per domain, and of routed expert mixtures.

What is scored (the same tokens for every model, so every number in a table is comparable):

- Each held-out document becomes ``<|bos|> ids <|eos|>`` (cut to ``max_doc_tokens``; a cut
  document gets no ``<|eos|>``), split into windows of ``seq_len`` inputs that share one token
  (window ``i`` is ``seq[i*T : i*T + T + 1]``); every window starts from an empty context.
- The first ``route_tokens`` tokens of a document are its *routing prefix*: routed evaluations
  choose experts from them alone (as a task is routed on its prompt), and **no model is scored
  on them**, so no routed number ever saw the tokens it is scored on. Documents with no token
  after the prefix are left out.
- ``PPL = exp(sum of token NLL / number of scored tokens)`` (:mod:`taskmoe.eval.nll`), per domain (the document's
  evaluation-only label) and over all documents (``"all"``, token-weighted).

Entry points: :func:`build_windows`, :func:`perplexity` (any LM), :func:`perplexity_matrix`
(expert x domain), :func:`routed_perplexity` (a :class:`~taskmoe.experts.ensemble.RoutedMixture`
with weights from the router: ``routed`` = the IMoE policy's selection, ``top1``, ``all`` = the
c-BTM confidence-weighted ensemble), and the CLI command ``taskmoe eval experts``
(:func:`eval_experts`: table + heatmap PNG + JSON).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from taskmoe.data.commands import corpus_command
from taskmoe.data.corpus import Corpus
from taskmoe.progress import progress_bar
from taskmoe.errors import ConfigError, DataError
from taskmoe.eval.nll import IGNORE_INDEX as IGNORE, perplexity as _ppl, row_nll
from taskmoe.experts.ensemble import RoutedMixture, routing_weights

ALL = "all"

__all__ = ["EvalWindows", "build_windows", "window_nll", "perplexity", "perplexity_matrix", "routed_perplexity",
           "route_prefixes", "plot_matrix", "eval_experts"]

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score(input_ids (B, T), window_rows (B,)) -> log-probabilities (B, T, V)``."""


@dataclass
class EvalWindows:
    """Scoring windows over held-out documents (see the module docstring)."""

    input_ids: torch.Tensor  # (N, T) int64, right-padded with pad_id
    targets: torch.Tensor  # (N, T) int64, IGNORE where not scored
    doc: torch.Tensor  # (N,) index of each window's document
    domains: list[str]  # per document ("-" when unlabelled)
    prefixes: list[list[int]]  # per document: the routing prefix (first route_tokens ids)
    skipped: int = 0  # documents with nothing to score after the prefix

    @property
    def n_docs(self) -> int:
        return len(self.domains)

    @property
    def tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def domain_names(self) -> list[str]:
        return sorted(set(self.domains))


def build_windows(docs: Sequence[Sequence[int]], domains: Sequence[str | None], *, seq_len: int, bos_id: int,
                  eos_id: int, pad_id: int, route_tokens: int = 32, max_doc_tokens: int | None = 512) -> EvalWindows:
    """Windows and targets for ``docs`` (token ids without specials), with their domains."""
    if seq_len < 1 or route_tokens < 0:
        raise ConfigError(f"seq_len must be >= 1 and route_tokens >= 0, got {seq_len}, {route_tokens}")
    if len(docs) != len(domains):
        raise ConfigError(f"{len(docs)} documents but {len(domains)} domain labels")
    ids_rows, tgt_rows, doc_of, kept_domains, prefixes = [], [], [], [], []
    skipped = 0
    for ids, dom in zip(docs, domains):
        ids = [int(t) for t in ids]
        cut = max_doc_tokens is not None and len(ids) > max_doc_tokens
        body = ids[:max_doc_tokens] if cut else ids
        seq = [bos_id, *body] + ([] if cut else [eos_id])
        # position j predicts seq[j + 1]; positions j < route_tokens predict the routing prefix
        if len(seq) - 1 <= route_tokens:
            skipped += 1
            continue
        d = len(kept_domains)
        kept_domains.append(dom if dom is not None else "-")
        prefixes.append(body[:route_tokens])
        for start in range(0, len(seq) - 1, seq_len):
            w = seq[start : start + seq_len + 1]
            inp = torch.full((seq_len,), pad_id, dtype=torch.long)
            tgt = torch.full((seq_len,), IGNORE, dtype=torch.long)
            inp[: len(w) - 1] = torch.tensor(w[:-1])
            tgt[: len(w) - 1] = torch.tensor(w[1:])
            first_scored = max(0, route_tokens - start)  # window positions before it are in the prefix
            tgt[:first_scored] = IGNORE
            if bool((tgt != IGNORE).any()):
                ids_rows.append(inp)
                tgt_rows.append(tgt)
                doc_of.append(d)
    if not ids_rows:
        raise DataError(f"no document has tokens to score after a routing prefix of {route_tokens} tokens "
                        f"({len(docs)} documents)")
    return EvalWindows(torch.stack(ids_rows), torch.stack(tgt_rows), torch.tensor(doc_of), kept_domains, prefixes, skipped)


@torch.no_grad()
def window_nll(score: Scorer, windows: EvalWindows, *, batch_size: int = 16, progress: bool = False,
               label: str = "scoring") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document summed NLL and scored-token counts, ``(n_docs,)`` float64 each."""
    nll = torch.zeros(windows.n_docs, dtype=torch.float64)
    cnt = torch.zeros(windows.n_docs, dtype=torch.float64)
    N = windows.input_ids.shape[0]
    with progress_bar(progress) as bar:
        task = bar.add_task(label, total=N)
        for s in range(0, N, batch_size):
            rows = torch.arange(s, min(s + batch_size, N))
            ids, tgt = windows.input_ids[rows], windows.targets[rows]  # (B, T)
            per_window, n = row_nll(score(ids, rows), tgt, log_probs=True)  # (B,) each; score: (B, T, V) log-probs
            nll.index_add_(0, windows.doc[rows], per_window)
            cnt.index_add_(0, windows.doc[rows], n)
            bar.advance(task, len(rows))
    return nll, cnt


def _by_domain(nll: torch.Tensor, cnt: torch.Tensor, windows: EvalWindows) -> dict[str, float]:
    out: dict[str, float] = {}
    dom = windows.domains
    for d in windows.domain_names():
        m = torch.tensor([x == d for x in dom])
        out[d] = _ppl(float(nll[m].sum() / cnt[m].sum()))
    out[ALL] = _ppl(float(nll.sum() / cnt.sum()))
    return out


def lm_scorer(model: nn.Module) -> Scorer:
    """Log-probabilities of a causal LM (its output's ``.logits``, or the tensor it returns)."""

    def score(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = model(ids)
        return getattr(out, "logits", out).float().log_softmax(-1)

    return score


def perplexity(model: nn.Module, windows: EvalWindows, *, batch_size: int = 16, progress: bool = False) -> dict[str, float]:
    """Perplexity of ``model`` per domain and over all documents (``"all"``)."""
    was = model.training
    model.eval()
    try:
        return _by_domain(*window_nll(lm_scorer(model), windows, batch_size=batch_size, progress=progress), windows)
    finally:
        model.train(was)


def perplexity_matrix(models: Mapping[str, nn.Module], windows: EvalWindows, *, batch_size: int = 16,
                      progress: bool = False) -> list[dict[str, Any]]:
    """One row per model: ``{"model": name, <domain>: ppl, ..., "all": ppl}``."""
    rows = []
    for name, m in models.items():
        rows.append({"model": name, **perplexity(m, windows, batch_size=batch_size, progress=progress)})
    return rows


def route_prefixes(router: Any, windows: EvalWindows) -> list[Any]:
    """One routing decision per document, on its routing prefix only."""
    return list(router.route_batch(windows.prefixes))


def routed_perplexity(decisions: Sequence[Any], categories: Sequence[str], experts: Mapping[str, nn.Module],
                      windows: EvalWindows, *, mode: str = "routed", batch_size: int = 16,
                      progress: bool = False) -> dict[str, float]:
    """Perplexity of the routed mixture ``sum_e w_e p_e`` per domain and overall.

    ``decisions[d]`` routes document ``d`` (see :func:`route_prefixes`); column ``e`` of its
    weights is ``categories[e]``. Categories without an expert in ``experts`` get weight 0 (a
    document routed only to them falls back to its confidences over the available experts).
    """
    if len(decisions) != windows.n_docs:
        raise ConfigError(f"{len(decisions)} routing decisions for {windows.n_docs} documents")
    have = [i for i, c in enumerate(categories) if c in experts]
    if not have:
        raise ConfigError(f"none of the categories {list(categories)} has an expert (experts: {sorted(experts)})")
    W = routing_weights(decisions, len(categories), mode)[:, have]  # (n_docs, E)
    C = routing_weights(decisions, len(categories), "all")[:, have]  # (n_docs, E) fallback
    mix = RoutedMixture({categories[i]: experts[categories[i]] for i in have})
    was = mix.training
    mix.eval()

    def score(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        d = windows.doc[rows]
        return mix(ids, W[d], C[d])

    try:
        return _by_domain(*window_nll(score, windows, batch_size=batch_size, progress=progress, label=f"{mode} mixture"),
                          windows)
    finally:
        mix.train(was)


def plot_matrix(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str | Path, *,
                title: str = "held-out perplexity") -> Path:
    """Heatmap of ``rows`` (label in ``"model"``) x ``columns``; colour = ppl / best ppl of the column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from taskmoe.io import atomic_write

    vals = np.array([[float(r[c]) for c in columns] for r in rows])  # (R, C)
    rel = vals / vals.min(0, keepdims=True)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 0.9 + 0.5 * len(rows)))
    im = ax.imshow(np.log(rel), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(columns)), list(columns))
    ax.set_yticks(range(len(rows)), [str(r["model"]) for r in rows])
    for i in range(len(rows)):
        for j in range(len(columns)):
            ax.text(j, i, f"{vals[i, j]:.1f}", ha="center", va="center", color="w" if rel[i, j] > 1.3 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="log(ppl / best in column)")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


@corpus_command
def eval_experts(
    run: Path = Path("runs/default"),
    split: str = "validation",
    seq_len: int = 256,
    route_tokens: int = 32,
    max_doc_tokens: int = 512,
    batch_size: int = 8,
    out: Optional[Path] = None,
    progress: bool = True,
    *,
    corpus: Corpus,
) -> Any:
    """Held-out perplexity of each expert on each domain, and of routed mixtures, with a heatmap.

    Reads RUN's router and experts (taskmoe.json, written by `taskmoe train experts`), scores the
    --split of the default corpus (or --source with --domain-field naming the label) and prints the
    expert x domain table plus the routed rows (routed = the router's selection and weights,
    top1, all = every expert weighted by confidence). Routing sees only each document's first
    --route-tokens tokens, which no model is scored on. Writes expert_perplexity.png and
    expert_perplexity.json to --out (default RUN/reports).
    """
    from rich.console import Group
    from rich.text import Text

    from taskmoe.experts.expert_lm import load_expert
    from taskmoe.io import atomic_write_json
    from taskmoe.manifest import load_manifest
    from taskmoe.router.router import Router

    res = load_manifest(run)
    router = Router.load(res.router)
    router.unavailable = frozenset(res.pruned)  # experts pruned in training: routed around
    if router.tokenizer is None or router.embedding is None:
        raise DataError(f"{res.router}: eval experts needs a router with tokenizer.json and a learned (shared) embedding")
    experts = {router.categories[k]: load_expert(p, router.embedding).eval() for k, p in sorted(res.experts.items())}
    if not experts:
        raise DataError(f"{res.run_dir}: taskmoe.json lists no experts; run `taskmoe train experts` first")
    if split not in corpus.splits or not corpus.splits[split]:
        raise DataError(f"split {split!r} is missing or empty (splits: {sorted(corpus.splits)})")
    docs = corpus.splits[split]
    tok = router.tokenizer
    windows = build_windows(tok.encode_batch([d.text for d in docs], allow_special=False), [d.domain for d in docs],
                            seq_len=seq_len, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                            route_tokens=route_tokens, max_doc_tokens=max_doc_tokens)
    matrix = perplexity_matrix(experts, windows, batch_size=batch_size, progress=progress)
    decisions = route_prefixes(router, windows)
    routed = [{"model": f"mixture: {m}", **routed_perplexity(decisions, router.categories, experts, windows, mode=m,
                                                              batch_size=batch_size, progress=progress)}
              for m in ("routed", "top1", "all")]
    cols = windows.domain_names() + [ALL]
    out = Path(out) if out is not None else Path(run) / "reports"
    png = plot_matrix(matrix + routed, cols, out / "expert_perplexity.png",
                      title=f"held-out perplexity ({split}, {windows.tokens} tokens)")
    js = atomic_write_json(out / "expert_perplexity.json", {
        "split": split, "seq_len": seq_len, "route_tokens": route_tokens, "max_doc_tokens": max_doc_tokens,
        "documents": windows.n_docs, "skipped_documents": windows.skipped, "tokens": windows.tokens,
        "matrix": matrix, "routed": routed, "descriptions": dict(zip(router.categories, router.descriptions)),
    })
    return Group(_rich_table(matrix, cols, "expert x domain perplexity"),
                 _rich_table(routed, cols, "routed mixtures (routing on the prefix only)"),
                 Text(f"written: {png}\nwritten: {js}"))


def _rich_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("model")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        best = {c: min(float(x[c]) for x in rows) for c in cols}
        t.add_row(str(r["model"]), *[(f"[bold]{r[c]:.2f}[/]" if float(r[c]) == best[c] else f"{r[c]:.2f}") for c in cols])
    return t
