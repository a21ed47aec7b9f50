"""Recipe: train a DOE model (``taskmoe train doe``), add an expert to it (``taskmoe doe add-expert``),
and report which expert takes which domain (``taskmoe doe report``).

Thin by design (setup / train / cleanup) over the shared loop (:func:`taskmoe.training.loop.train`)
and the model in :mod:`taskmoe.doe`:

- **setup**: corpus (the embedded default, or ``--source``), tokenizer (given, or trained on the
  corpus and cached), and one window set per split. Windows never cross a document boundary
  (a sequence is routed as a whole, so it must be one document): each document is cut into
  windows of ``seq_len + 1`` tokens (``<|bos|>`` first, the last one padded). The first
  ``prompt_len`` positions are the *prompt*: routing pools over them only, and the loss skips
  the targets that routing has already seen (``t < prompt_len - 1``), so training measures
  exactly what generation does: continue a sequence routed from its prompt.
- **train**: LM cross-entropy + ``gate_loss_weight`` x the gate BCE (targets: the capacity
  assignment, or the IMoE router's categories with ``--gate-supervision router``). With
  ``--compare-dense`` a dense transformer with the same active parameters is trained on the same
  windows for the same steps.
- **cleanup**: the model folder (``kind = "doe"``, with ``tokenizer.json``), and a report:
  held-out perplexity of both models, the expert x domain table, NMI / purity of the chosen expert
  vs domain (domains are never given to the model), and a heatmap PNG.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from taskmoe.data.commands import DEFAULT_VOCAB_SIZE, corpus_tokenizer, get_corpus
from taskmoe.data.corpus import Corpus
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.doe.model import DOEConfig, DOETransformer, build_doe, load_doe, save_doe
from taskmoe.doe.routing import gate_loss
from taskmoe.errors import ConfigError, DataError
from taskmoe.eval.nll import batched, corpus_nll
from taskmoe.eval.routing import contingency, nmi, purity
from taskmoe.io import atomic_write_json
from taskmoe.models import TransformerLMConfig, transformer_lm
from taskmoe.training.config import TrainConfig
from taskmoe.training.losses import IGNORE_INDEX, lm_cross_entropy
from taskmoe.training.loop import train as train_loop

DEFAULT_OUT = Path("runs/default/doe")
TOKENIZER_FILE = "tokenizer.json"


# ------------------------------------------------------------------------------------ data
class DocumentWindows(Dataset):
    """Per-document windows for sequence routing (see module docstring).

    Item: ``input_ids`` (T,), ``targets`` (T,) (``-100`` on padding and inside the prompt),
    ``prompt_mask`` (T,) bool, ``domain`` () index into ``domains`` (-1 unknown), ``label`` ()
    gate label (-1 none), with ``T = seq_len``.
    """

    def __init__(self, docs_ids: Sequence[Sequence[int]], domains: Sequence[int], labels: Sequence[int] | None,
                 *, seq_len: int, prompt_len: int, bos_id: int, pad_id: int, min_targets: int = 8) -> None:
        if not 1 <= prompt_len < seq_len:
            raise ConfigError(f"DocumentWindows: need 1 <= prompt_len ({prompt_len}) < seq_len ({seq_len})")
        labels = list(labels) if labels is not None else [-1] * len(docs_ids)
        rows, meta = [], []
        for ids, dom, lab in zip(docs_ids, domains, labels):
            seq = [bos_id, *ids]
            for start in range(0, max(1, len(seq) - 1), seq_len):
                w = seq[start : start + seq_len + 1]
                if len(w) - 1 < prompt_len - 1 + min_targets:
                    continue
                rows.append(w + [pad_id] * (seq_len + 1 - len(w)))
                meta.append((len(w), dom, lab))
        if not rows:
            raise DataError(f"DocumentWindows: no document has prompt_len + {min_targets} = "
                            f"{prompt_len + min_targets} tokens; lower prompt_len or add data")
        self.tokens = torch.tensor(rows, dtype=torch.long)  # (N, T + 1)
        self.lengths = torch.tensor([m[0] for m in meta])
        self.domains = torch.tensor([m[1] for m in meta])
        self.labels = torch.tensor([m[2] for m in meta])
        self.seq_len, self.prompt_len = seq_len, prompt_len

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.tokens[i]
        T, P = self.seq_len, self.prompt_len
        targets = w[1:].clone()
        pos = torch.arange(T)
        targets[(pos >= self.lengths[i] - 1) | (pos < P - 1)] = IGNORE_INDEX
        return {"input_ids": w[:-1], "targets": targets, "prompt_mask": pos < P, "domain": self.domains[i],
                "label": self.labels[i]}


def windows_for(docs: Sequence[Any], tok: Tokenizer, domains: Sequence[str], seq_len: int, prompt_len: int,
                labels: Sequence[int] | None = None) -> DocumentWindows:
    ids = tok.encode_batch([d.text for d in docs], allow_special=False)
    dom = [domains.index(d.domain) if d.domain in domains else -1 for d in docs]
    return DocumentWindows(ids, dom, labels, seq_len=seq_len, prompt_len=prompt_len, bos_id=tok.bos_id,
                           pad_id=tok.pad_id)


# ---------------------------------------------------------------------------------- losses
def doe_loss_fn(gate_weight: float, supervised: bool) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]:
    """``loss = CE(logits, targets) + gate_weight * BCE(gates)``; works on a DDP-wrapped model."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["input_ids"], prompt_mask=batch["prompt_mask"])
        lm = lm_cross_entropy(out.logits, batch["targets"])
        g = gate_loss(out.routing, batch["label"] if supervised else None)
        n_experts = out.routing.scores.shape[1]
        share = torch.bincount(out.routing.top1(), minlength=n_experts).float() / out.routing.batch_size
        return lm + gate_weight * g, {"lm": lm.detach(), "gate": g.detach(), "max_share": share.max(),
                                      "tokens": int((batch["targets"] != IGNORE_INDEX).sum())}

    return loss_fn


def dense_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    out = model(batch["input_ids"])
    lm = lm_cross_entropy(out.logits, batch["targets"])
    return lm, {"lm": lm.detach(), "tokens": int((batch["targets"] != IGNORE_INDEX).sum())}


def perplexity(model: nn.Module, data: DocumentWindows, batch_size: int = 16) -> float:
    """``exp(sum NLL / #targets)`` over every window (eval mode: DOE routes by threshold)."""
    doe = isinstance(model, DOETransformer)

    def forward(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"prompt_mask": b["prompt_mask"]} if doe else {}
        return model(b["input_ids"], **kw).logits, b["targets"]

    return corpus_nll(forward, batched(data, batch_size, default_collate), model=model).ppl


@torch.no_grad()
def expert_choices(model: DOETransformer, data: DocumentWindows, batch_size: int = 32) -> tuple[list[int], list[bool]]:
    """Each window's best expert (eval routing from its prompt) and whether it fell back to the default."""
    was = model.training
    model.eval()
    top, fb = [], []
    try:
        for i in range(0, len(data), batch_size):
            b = [data[j] for j in range(i, min(len(data), i + batch_size))]
            r = model.route(torch.stack([x["input_ids"] for x in b]), torch.stack([x["prompt_mask"] for x in b]))
            top += r.top1().tolist()
            fb += r.fallback.tolist()
    finally:
        model.train(was)
    return top, fb


# ---------------------------------------------------------------------------------- report
def routing_report(model: DOETransformer, data: DocumentWindows, domains: Sequence[str], out_dir: Path,
                   *, title: str = "DOE: expert chosen vs domain") -> dict[str, Any]:
    """Expert x domain counts, NMI and purity of the chosen expert vs domain, and a heatmap PNG."""
    top, fb = expert_choices(model, data)
    dom = data.domains.tolist()
    known = [i for i, d in enumerate(dom) if d >= 0]
    if not known:
        raise DataError("routing report: no window has a known domain (the corpus carries no domain labels)")
    true = [domains[dom[i]] for i in known]
    pred = [top[i] for i in known]
    names = list(model.expert_names)
    table = contingency(true, pred, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_heatmap(table, names, sorted(set(true)), out_dir / "doe_routing.png", title)
    report = {"windows": len(known), "nmi": nmi(true, pred), "purity": purity(true, pred),
              "fallback_rate": sum(fb[i] for i in known) / len(known), "table": table, "plot": str(png)}
    atomic_write_json(out_dir / "doe_routing.json", report)
    return report


def plot_heatmap(table: list[dict[str, Any]], experts: Sequence[str], domains: Sequence[str], path: Path,
                 title: str) -> Path:
    """Share of each domain's windows taken by each expert (columns sum to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array([[row.get(d, 0) for d in domains] for row in table], dtype=float)  # (E, domains)
    share = counts / np.maximum(1.0, counts.sum(axis=0, keepdims=True))
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(domains), 1.0 + 0.5 * len(experts)))
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(experts)), experts)
    for i in range(share.shape[0]):
        for j in range(share.shape[1]):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color="w" if share[i, j] < 0.6 else "k")
    ax.set_xlabel("domain (evaluation-only label)")
    ax.set_ylabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of the domain's windows")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    corpus: Corpus
    tok: Tokenizer
    domains: list[str]
    train: DocumentWindows
    val: DocumentWindows


def router_labels(router_dir: Path, docs: Sequence[Any]) -> tuple[list[int], list[str]]:
    """The IMoE router's top category per document (its own tokenizer), and its category names."""
    from taskmoe.router.router import Router

    router = Router.load(router_dir)
    if router.tokenizer is None:
        raise ConfigError(f"{router_dir}: the router folder has no tokenizer.json; it cannot label text")
    conf = router.confidences(router.tokenizer.encode_batch([d.text for d in docs]))
    return [int(i) for i in conf.argmax(axis=1)], list(router.categories)


def setup(source: Optional[str], tokenizer: Optional[Path], vocab_size: int, max_docs_per_domain: Optional[int],
          seq_len: int, prompt_len: int, progress: bool, labels_from: Optional[Path] = None) -> tuple[Setup, list[str] | None]:
    corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress)
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else corpus_tokenizer(corpus, vocab_size, progress=progress)
    domains = list(corpus.domains)
    cats = None
    tr_labels = va_labels = None
    if labels_from is not None:
        tr_labels, cats = router_labels(labels_from, corpus.train)
        va_labels, _ = router_labels(labels_from, corpus.validation)
    train = windows_for(corpus.train, tok, domains, seq_len, prompt_len, tr_labels)
    val = windows_for(corpus.validation or corpus.test, tok, domains, seq_len, prompt_len, va_labels)
    return Setup(corpus, tok, domains, train, val), cats


def _train_cfg(steps: int, batch_size: int, lr: float, seed: int, progress: bool) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20), seed=seed,
                       progress=progress, eval_every=0, save_every=0, log_every=10, weight_decay=0.1)


# ------------------------------------------------------------------------------------ CLI
def train_doe(
    out: Path = DEFAULT_OUT,
    source: Optional[str] = None,
    tokenizer: Optional[Path] = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_docs_per_domain: Optional[int] = None,
    experts: int = 4,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    moe_every: int = 1,
    max_experts: int = 1,
    tau: float = 0.5,
    capacity_factor: float = 1.0,
    gate_supervision: str = "none",
    router: Optional[Path] = None,
    gate_loss_weight: float = 0.1,
    seq_len: int = 256,
    prompt_len: int = 32,
    steps: int = 500,
    batch_size: int = 16,
    lr: float = 2e-3,
    compare_dense: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a DOE transformer (sequence-routed experts) on the embedded corpus, or --source.

    Reports held-out perplexity (and a dense transformer's with the same active parameters when
    --compare-dense), and which expert takes which domain (NMI, table, heatmap). With
    --gate-supervision router, --router names a fitted IMoE router folder whose categories
    supervise the gates (one expert per category).
    """
    if gate_supervision == "router" and router is None:
        raise ConfigError("train doe: --gate-supervision router needs --router PATH (a fitted router folder)")
    torch.manual_seed(seed)
    t0 = time.time()
    s, cats = setup(source, tokenizer, vocab_size, max_docs_per_domain, seq_len, prompt_len, progress,
                    labels_from=router if gate_supervision == "router" else None)
    names = [c.replace(" ", "_") for c in cats] if cats else [f"e{i}" for i in range(experts)]
    lm = TransformerLMConfig(vocab_size=s.tok.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    cfg = DOEConfig(lm=lm, experts=names, moe_every=moe_every, tau=tau, max_experts=max_experts,
                    capacity_factor=capacity_factor, gate_supervision=gate_supervision, gate_loss_weight=gate_loss_weight)
    model = build_doe(cfg)
    tcfg = _train_cfg(steps, batch_size, lr, seed, progress)
    res = train_loop(model, doe_loss_fn(gate_loss_weight, gate_supervision == "router"), s.train, tcfg,
                     out_dir=out / "train", resume=True)
    folder = save_doe(model, out / "model", meta={"steps": res.steps, "domains": s.domains},
                      extra_files={TOKENIZER_FILE: lambda p: p.write_text(s.tok.to_str(), encoding="utf-8")})
    summary: dict[str, Any] = {"model": str(folder), "steps": res.steps, "train_windows": len(s.train),
                               "val_windows": len(s.val), **{f"params_{k}": v for k, v in model.count_params().items()},
                               "doe_val_ppl": perplexity(model, s.val)}
    if compare_dense:
        torch.manual_seed(seed)
        dense = transformer_lm(lm)
        train_loop(dense, dense_loss_fn, s.train, tcfg, out_dir=out / "train_dense", resume=True)
        summary["dense_params"] = dense.num_params()
        summary["dense_val_ppl"] = perplexity(dense, s.val)
    rep = routing_report(model, s.val, s.domains, out / "reports")
    summary.update({"nmi_expert_vs_domain": rep["nmi"], "purity": rep["purity"], "fallback_rate": rep["fallback_rate"],
                    "plot": rep["plot"], "seconds": time.time() - t0})
    atomic_write_json(out / "reports" / "metrics.json", summary)
    return summary


def _load_with_tokenizer(model: Path) -> tuple[DOETransformer, Tokenizer]:
    m = load_doe(model)
    tok_path = Path(model) / TOKENIZER_FILE
    if not tok_path.is_file():
        raise ConfigError(f"{tok_path}: missing; a DOE model folder written by `train doe` holds its tokenizer")
    return m, Tokenizer.load(tok_path)


def doe_report(
    model: Path = DEFAULT_OUT / "model",
    source: Optional[str] = None,
    split: str = "validation",
    max_docs_per_domain: Optional[int] = None,
    out: Optional[Path] = None,
    seq_len: int = 256,
    prompt_len: int = 32,
) -> list[dict[str, Any]]:
    """Which expert takes which domain: table, NMI of the chosen expert vs domain, heatmap PNG."""
    m, tok = _load_with_tokenizer(model)
    corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=False)
    if split not in corpus.splits:
        raise ConfigError(f"doe report: split must be one of {sorted(corpus.splits)}, got {split!r}")
    domains = list(corpus.domains)
    data = windows_for(corpus.splits[split], tok, domains, seq_len, prompt_len)
    rep = routing_report(m, data, domains, Path(out) if out is not None else Path(model).parent / "reports")
    print(f"NMI(expert, domain) = {rep['nmi']:.3f}, purity = {rep['purity']:.3f}, "
          f"fallback = {rep['fallback_rate']:.1%} over {rep['windows']} windows; plot: {rep['plot']}")
    return rep["table"]


def add_expert(
    model: Path = DEFAULT_OUT / "model",
    name: str = "new",
    domain: str = "code",
    source: Optional[str] = None,
    max_docs_per_domain: Optional[int] = None,
    init_from: Optional[str] = None,
    out: Optional[Path] = None,
    seq_len: int = 256,
    prompt_len: int = 32,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Add an expert to a trained DOE model and train only it and its gate on one domain's data.

    Positives are the --domain documents (or every document of --source); negatives are as many
    documents of the default corpus's other domains. Everything else stays frozen, so sequences the new gate
    rejects keep bit-identical outputs.
    """
    m, tok = _load_with_tokenizer(model)
    corpus = get_corpus(None, max_docs_per_domain=max_docs_per_domain, progress=progress)
    domains = list(corpus.domains)
    if source is not None:
        pos_docs = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress).train
        neg_docs = corpus.train
    else:
        if domain not in domains:
            raise ConfigError(f"doe add-expert: domain must be one of {domains}, got {domain!r}")
        pos_docs = [d for d in corpus.train if d.domain == domain]
        neg_docs = [d for d in corpus.train if d.domain != domain]
    # as many negatives as positives (deterministic pick), so the gate's BCE is balanced
    step = max(1, len(neg_docs) // max(1, len(pos_docs)))
    neg_docs = list(neg_docs)[::step][: len(pos_docs)]
    data = windows_for(list(pos_docs) + list(neg_docs), tok, domains, seq_len, prompt_len,
                       [1] * len(pos_docs) + [0] * len(neg_docs))
    torch.manual_seed(seed)
    m.add_expert(name, init_from=init_from)
    m.freeze_except(name)
    j = m.expert_names.index(name)
    E = len(m.expert_names)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        lab = batch["label"]
        force = torch.full((lab.shape[0], E), -1, dtype=torch.long, device=lab.device)
        force[:, j] = lab  # the new expert serves its own data during training, never the rest;
        # the frozen experts route by threshold, as they will at inference
        out_ = model(batch["input_ids"], prompt_mask=batch["prompt_mask"], force=force, capacity=False)
        tgt = batch["targets"].masked_fill(lab.unsqueeze(1) == 0, IGNORE_INDEX)  # LM loss on its data only
        lm = lm_cross_entropy(out_.logits, tgt)
        bce = torch.nn.functional.binary_cross_entropy(out_.routing.scores[:, j].float().clamp(1e-6, 1 - 1e-6),
                                                       lab.float())
        return lm + bce, {"lm": lm.detach(), "gate": bce.detach(), "tokens": int((tgt != IGNORE_INDEX).sum())}

    dest = Path(out) if out is not None else Path(model)
    res = train_loop(m, loss_fn, data, _train_cfg(steps, batch_size, lr, seed, progress),
                     out_dir=dest.parent / f"{dest.name}.train_add_{name}", resume=True)
    for p in m.parameters():
        p.requires_grad_(True)
    m.eval()
    with torch.no_grad():
        acc = []
        for i in range(0, len(data), 64):
            b = [data[k] for k in range(i, min(len(data), i + 64))]
            r = m.route(torch.stack([x["input_ids"] for x in b]), torch.stack([x["prompt_mask"] for x in b]))
            acc += r.accepted[:, j].tolist()
    labels = data.labels.tolist()
    tp = sum(a and lab == 1 for a, lab in zip(acc, labels))
    fp = sum(a and lab == 0 for a, lab in zip(acc, labels))
    folder = save_doe(m, dest, extra_files={TOKENIZER_FILE: lambda p: p.write_text(tok.to_str(), encoding="utf-8")})
    return {"model": str(folder), "expert": name, "steps": res.steps, "experts": list(m.expert_names),
            "accept_rate_own_train": tp / max(1, labels.count(1)), "accept_rate_other_train": fp / max(1, labels.count(0))}
