"""Recipe: train the IMoE experts of a run folder (``taskmoe train experts``), with the seed's pruning.

Thin by design (setup / train / cleanup) over the shared loop (:func:`taskmoe.training.loop.train`):

- **setup** (:func:`setup`): load the run's router (its learned encoder owns the shared
  embedding table and its tokenizer), tokenise the corpus, route every train and validation
  document (:func:`taskmoe.experts.assign.route_documents`: selected categories, several for a
  multi-category document, all for a fallback one), and per expert pack its documents into
  ``seq_len`` windows (:class:`taskmoe.data.PackedLMDataset`). The semantic loss's retrieval
  index holds the expert's own training windows embedded with the router's encoder; every
  window gets its ``neighbours`` nearest other training windows once, here
  (:class:`taskmoe.experts.semantic_loss.RetrievalWindows`; validation windows query the same
  index).
- **train** (:func:`train`, also named :func:`train_expert`): build the expert around the shared table (frozen unless
  ``fine_tune_embedding``), seeded, and run the loop with :func:`expert_loss`:
  ``(1 - λ) * CE + λ * L_sem``. ``L_sem`` is computed whenever λ > 0 and always at
  evaluation, so ``eval_sem_sim = 1 - L_sem`` (the semantic-similarity score) is reported for
  every λ, and ``eval_ce`` gives the validation perplexity whatever λ is.
- **cleanup** (:func:`cleanup`): the main process saves ``experts/<name>/`` (without the shared table) and
  registers it in ``taskmoe.json`` under a file lock (jobs for different experts may finish
  at the same time on a cluster).

Checkpoints and metrics of each expert go to ``<run>/train/experts/<name>/``; rerunning resumes.
``accelerate launch --multi_gpu --num_processes N -m taskmoe.cli train experts ...`` runs the
same code under DDP (gloo on CPU): every process does the same deterministic setup and the loop
shards the batches, so N processes with ``batch_size`` B train like one with B * N.

Pruning (``cfg.pruning``, :mod:`taskmoe.training.recipes.pruning`): each training window is a
feed-forward the expert contributes to when the router gives it weight there; an expert that
contributes to fewer than 3 of a window of 10 stops training, is not saved, and is recorded under
the manifest's ``pruned``. Joint (mixture) training of the trained experts, with the same rule,
is :mod:`taskmoe.training.recipes.mixture` (``taskmoe train mixture``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from taskmoe.config import Config, FlagPaths, check, doc
from taskmoe.errors import CheckpointError
from taskmoe.experts.assign import Assignment
from taskmoe.experts.expert_lm import build_expert, expert_config, save_expert
from taskmoe.experts.pruning import PruningConfig
from taskmoe.experts.semantic_loss import (
    RetrievalIndex,
    RetrievalWindows,
    combined_loss,
    encode_windows,
    expected_embedding,
    semantic_similarity_loss,
)
from taskmoe.eval.nll import perplexity
from taskmoe.io import read_json
from taskmoe.manifest import MANIFEST_FILE, Manifest, Thresholds, manifest_lock
from taskmoe.models.config import ExpertLMConfig
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import TrainResult, make_accelerator, train as train_loop
from taskmoe.training.recipes.routed_corpus import route_corpus
from taskmoe.training.recipes.command import recipe_command
from taskmoe.training.recipes.pruning import expert_pruning, pruned_names, window_route_weights
from taskmoe.training.losses import lm_cross_entropy

__all__ = ["ExpertsRecipeConfig", "ExpertData", "ExpertsSetup", "setup", "train", "cleanup", "expert_loss", "train_expert",
           "register_experts", "train_experts", "FLAGS"]

INDEX_BACKENDS = ("auto", "exact", "faiss")


@dataclass
class ExpertsRecipeConfig(Config):
    """Expert size, data windows, the semantic loss and the training run (per expert)."""

    lm: ExpertLMConfig = doc(ExpertLMConfig(n_layers=4, n_heads=4),
                             "the expert's ExpertLMConfig; vocab_size and d_model are taken from the router's shared table")
    seq_len: int = doc(128, "tokens per training window")
    lam: float = doc(0.0, "λ: loss = (1 - λ) * CE + λ * L_sem (1 = the seed's pure semantic loss)")
    neighbours: int = doc(4, "k nearest training windows the semantic loss compares with")
    index_backend: str = doc("auto", "retrieval index: auto (faiss when installed and the index is large), exact, faiss")
    fine_tune_embedding: bool = doc(False, "give each expert its own trainable copy of the shared table (stored in its folder)")
    val_windows: int = doc(256, "at most this many validation windows per expert (evenly spaced)")
    pruning: PruningConfig = doc(PruningConfig(), "the seed's pruning while each expert trains "
                                                 "(taskmoe.training.recipes.pruning; enabled=false turns it off)")
    train: TrainConfig = doc(TrainConfig(max_steps=300, batch_size=8, lr=1e-3, warmup_steps=30, eval_every=100,
                                         save_every=100, eval_batches=8),
                             "the training run of each expert")

    def validate(self) -> None:
        check(self.seq_len >= 2, f"experts.seq_len must be >= 2, got {self.seq_len}")
        check(0.0 <= self.lam <= 1.0, f"experts.lam (λ) must be in [0, 1], got {self.lam}")
        check(self.neighbours >= 1, f"experts.neighbours must be >= 1, got {self.neighbours}")
        check(self.index_backend in INDEX_BACKENDS, f"experts.index_backend must be one of {INDEX_BACKENDS}, got {self.index_backend!r}")
        check(self.val_windows >= 1, f"experts.val_windows must be >= 1, got {self.val_windows}")


# ------------------------------------------------------------------------------------ setup
@dataclass
class ExpertData:
    """One expert's training (and validation) windows with their retrieval neighbours."""

    name: str
    train: RetrievalWindows
    eval: RetrievalWindows | None
    documents: int
    tokens: int
    route_weights: torch.Tensor | None = None  # (N,) the router's weight for this expert per training window


@dataclass
class ExpertsSetup:
    run_dir: Path
    router: Any
    shared: nn.Embedding
    token_weight: torch.Tensor  # (V,) the encoder's pooling weights (0 for tokens it does not know)
    assignment: Assignment
    data: dict[str, ExpertData]
    cfg: ExpertsRecipeConfig


def load_router(run_dir: Path) -> Any:
    """The run's router; it must have a tokenizer and a learned (shared) embedding table."""
    from taskmoe.router.router import Router

    folder = Path(run_dir) / "router"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no router in the run folder (run `taskmoe route fit --out {folder}` first)")
    router = Router.load(folder)
    if router.embedding is None:
        raise CheckpointError(f"{folder}: the router's encoder is {router.encoder.kind!r}; experts need the shared "
                              "embedding table of a 'learned' encoder (route fit --encoder learned)")
    if router.tokenizer is None:
        raise CheckpointError(f"{folder}: the router folder has no tokenizer.json")
    return router


def setup(run_dir: Path, corpus: Any, cfg: ExpertsRecipeConfig, experts: Sequence[str] | None = None, *,
          progress: bool = True, log: Callable[[str], None] = lambda s: None) -> ExpertsSetup:
    """Route the corpus and build each requested expert's windows (module docstring)."""
    run_dir = Path(run_dir)
    router = load_router(run_dir)
    tok = router.tokenizer
    rc = route_corpus(router, corpus, experts, progress=progress, log=log)
    data: dict[str, ExpertData] = {}
    for name in rc.names:
        n_docs, windows, vw = rc.windows(name, tok, cfg.seq_len, cfg.val_windows)
        vectors = encode_windows(router.encode, windows)  # (N, D)
        index = RetrievalIndex(vectors, backend=cfg.index_backend)
        train_ds = RetrievalWindows(windows, vectors, index, cfg.neighbours, exclude_self=True)
        eval_ds = None
        if vw:
            eval_ds = RetrievalWindows(vw, encode_windows(router.encode, vw), index, cfg.neighbours, exclude_self=False)
        weights = window_route_weights(router, windows, router.categories.index(name)) if cfg.pruning.enabled else None
        data[name] = ExpertData(name, train_ds, eval_ds, n_docs, len(windows) * cfg.seq_len, weights)
        log(f"expert {name}: {n_docs} documents, {len(windows)} windows, "
            f"{len(eval_ds) if eval_ds is not None else 0} validation windows, index {index.backend}")
    token_weight = router.encoder.token_weight.detach().clone()
    return ExpertsSetup(run_dir, router, router.embedding, token_weight, rc.assignment, data, cfg)


# ------------------------------------------------------------------------------------- train
def expert_loss(lam: float, table: torch.Tensor, token_weight: torch.Tensor | None = None) -> Callable[[nn.Module, dict], tuple]:
    """``loss_fn(model, batch)`` for the loop: ``(1 - λ) CE + λ L_sem`` (module docstring).

    ``table`` (V, D) is the router's (frozen) embedding table, ``token_weight`` (V,) its
    encoder's pooling weights: the expected embedding of the expert's predictions lives in the
    same space as the encoder vectors of the retrieved neighbours.
    """
    table = table.detach()
    tw = token_weight.detach() if token_weight is not None else None

    def fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["input_ids"])
        logits = getattr(out, "logits", out)
        ce = lm_cross_entropy(logits, batch["targets"])
        metrics: dict[str, Any] = {"tokens": int(batch["targets"].numel()), "ce": ce.detach()}
        sem = None
        if "neighbours" in batch and (lam > 0 or not model.training):
            z = expected_embedding(logits, table.to(logits.device), token_weights=None if tw is None else tw.to(logits.device))
            sem = semantic_similarity_loss(z, batch["neighbours"])
            metrics["sem_sim"] = 1.0 - sem.detach()
        return combined_loss(ce, sem, lam), metrics

    return fn


def train(name: str, st: ExpertsSetup, *, accelerator: Any = None, resume: bool = True,
          save: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train expert ``name`` of ``st`` with the shared loop; save it (main process) unless ``save=False``."""
    cfg = st.cfg
    d = st.data[name]
    acc = accelerator if accelerator is not None else make_accelerator(cfg.train)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every process and in every rerun
    model = build_expert(expert_config(st.shared, cfg.lm), st.shared, fine_tune_embedding=cfg.fine_tune_embedding)
    t0 = time.perf_counter()
    loss, callbacks = expert_loss(cfg.lam, st.shared.weight, st.token_weight), []
    if d.route_weights is not None:  # the seed's pruning (taskmoe.training.recipes.pruning)
        others = len(st.router.categories) - 1 - len(set(pruned_names(st.run_dir)) - {name})
        loss, cb = expert_pruning(name, d.route_weights, cfg.pruning, others, loss)
        callbacks.append(cb)
    res: TrainResult = train_loop(model, loss, d.train, cfg.train, eval_data=d.eval, callbacks=callbacks,
                                  out_dir=st.run_dir / "train" / "experts" / name, resume=resume, accelerator=acc)
    last = res.eval_history[-1] if res.eval_history else {}
    row: dict[str, Any] = {
        "expert": name, "documents": d.documents, "windows": len(d.train), "steps": res.steps,
        "train_loss": res.losses[-1] if res.losses else None,
        "val_ppl": perplexity(last["eval_ce"]) if "eval_ce" in last else None,
        "val_sem_sim": last.get("eval_sem_sim"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if callbacks and callbacks[0].tracker.pruned:  # not saved; the manifest records it
        row["pruned"] = {"stage": "experts", **callbacks[0].events[-1]}
        if acc.is_main_process:
            register_experts(st.run_dir, st.router, [], pruned={name: row["pruned"]})
    elif save and acc.is_main_process:
        folder = save_expert(model, st.run_dir / "experts" / name, st.shared,
                             meta={"recipe": cfg.to_dict(), "report": row, "category": name,
                                   "description": st.router.descriptions[st.router.categories.index(name)]})
        row["folder"] = str(folder)
    acc.wait_for_everyone()
    return model, row


train_expert = train
"""The recipe's train step under its descriptive name."""


# ----------------------------------------------------------------------------------- cleanup
def register_experts(run_dir: Path, router: Any, names: Sequence[str], *, pruned: dict[str, dict] | None = None) -> Path:
    """Add ``experts/<name>`` for each name to ``run_dir/taskmoe.json`` (created if missing), under a lock.

    Each name in ``pruned`` is recorded under the manifest's ``pruned`` instead (with its record:
    stage, step, window, counts). A name the manifest already lists as pruned stays pruned
    (delete its entry from ``pruned`` to train and register it again)."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    with manifest_lock(run_dir):
        if path.is_file():
            m = Manifest.from_dict(read_json(path), source=str(path))
        else:
            tok = "tokenizer.json" if (run_dir / "tokenizer.json").is_file() else "router/tokenizer.json"
            pol = router.policy
            m = Manifest(tokenizer=tok, router="router", vocab_size=router.embedding.num_embeddings,
                         d_model=router.embedding.embedding_dim,
                         thresholds=Thresholds(t_C_base=pol.t_C_base, k=pol.k, t_CT=pol.t_CT))
        experts, gone = dict(m.experts), dict(m.pruned)
        for n in [*names, *(pruned or {})]:
            key = str(router.categories.index(n))
            if n in (pruned or {}):
                gone[key] = {"expert": n, **(pruned or {})[n]}
                experts.pop(key, None)
            elif key not in gone:
                experts[key] = f"experts/{n}"
        by_key = lambda d: dict(sorted(d.items(), key=lambda kv: int(kv[0])))  # noqa: E731
        return m.replace(experts=by_key(experts), pruned=by_key(gone)).save(run_dir)


def cleanup(st: ExpertsSetup, names: Sequence[str]) -> Path:
    """The recipe's cleanup step: register the trained experts ``names`` in the run's manifest."""
    return register_experts(st.run_dir, st.router, names)


FLAGS: dict[str, FlagPaths] = {
    "steps": "train.max_steps", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
    "lr": "train.lr", "seed": "train.seed", "progress": "train.progress", "n_layers": "lm.n_layers",
    "n_heads": "lm.n_heads", "seq_len": "seq_len", "lam": "lam", "neighbours": "neighbours",
    "fine_tune_embedding": "fine_tune_embedding",
}
"""``train experts`` flag -> the config path it sets."""
RANK = 16
"""``--rank``: the LoRA rank of each adapter expert with ``--backbone``."""
BACKBONE_FLAGS: dict[str, FlagPaths] = {k: v for k, v in FLAGS.items()
                                        if k in ("steps", "batch_size", "grad_accum", "lr", "seed", "progress", "seq_len")}
"""The flags that apply with ``--backbone`` (to an :class:`AdapterExpertsConfig`; the rest must stay unset)."""


def _backbone_variant(a: dict[str, Any]) -> Any:
    if a["backbone"] is None:
        return None
    from taskmoe.training.recipes.backbone_experts import AdapterExpertsConfig

    return AdapterExpertsConfig, BACKBONE_FLAGS


def _backbone_rank(a: dict[str, Any]) -> dict[str, Any]:
    """``--rank R`` sets the adapters' ``r`` and ``alpha = 2 R`` (without ``--config``, or when given)."""
    if a["backbone"] is None or (a["config"] is not None and a["rank"] == RANK):
        return {}
    return {"r": a["rank"], "alpha": 2.0 * a["rank"]}


@recipe_command(ExpertsRecipeConfig, FLAGS, recipe="train experts", variant=_backbone_variant, derive=_backbone_rank)
def train_experts(run: Path = Path("runs/default"), expert: Optional[str] = None, source: Optional[str] = None,
                  max_docs_per_domain: Optional[int] = None, backbone: Optional[Path] = None, rank: int = RANK,
                  progress: bool = True, *, cfg: Any) -> list[dict[str, Any]]:
    """Train the experts of a run folder that has a router (all, or one with --expert NAME).

    The router labels the corpus (the default corpus, or --source): each expert trains on the
    documents routed to its category (a multi-category document trains each, a fallback
    document trains all), around the router's shared embedding table (frozen unless
    --fine-tune-embedding). Loss (1 - λ) CE + λ L_sem with --lam λ (semantic similarity to the
    expert's own nearest training windows). --config reads an ExpertsRecipeConfig JSON; the
    flags given override it, and --set PATH=VALUE (repeatable, e.g. --set train.lr=3e-4
    --set lm.attention.chunk_size=32) overrides any field last. Writes RUN/experts/NAME/ and registers it in RUN/taskmoe.json;
    checkpoints in RUN/train/experts/NAME/ (a rerun resumes). One job per expert on a cluster:
    --expert NAME. Several processes (DDP, gloo on CPU):
    accelerate launch --multi_gpu --num_processes 2 -m taskmoe.cli train experts ...
    With --backbone DIR each expert is instead a LoRA adapter (rank --rank) of that frozen backbone
    (router fitted with route fit --backbone DIR), saved in PEFT's layout in RUN/experts/NAME/
    (see taskmoe.training.recipes.backbone_experts); --lr, --steps, --batch-size, --grad-accum,
    --seq-len and --seed apply, the small-expert options are refused.
    """
    from taskmoe.data.commands import get_corpus

    if backbone is not None:
        from taskmoe.training.recipes.backbone_experts import train_backbone_experts

        corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress)
        return train_backbone_experts(Path(run), corpus, Path(backbone), cfg, [expert] if expert else None,
                                      progress=progress, log=print if progress else (lambda s: None))
    acc = make_accelerator(cfg.train)
    say = print if (progress and acc.is_main_process) else (lambda s: None)
    corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress and acc.is_main_process)
    st = setup(Path(run), corpus, cfg, [expert] if expert else None, progress=progress and acc.is_main_process, log=say)
    rows = []
    gone = pruned_names(st.run_dir)
    for name in st.data:
        if name in gone:
            say(f"expert {name} was pruned ({gone[name]}); skipped (delete it from 'pruned' in taskmoe.json to retrain)")
            continue
        say(f"training expert {name} ({acc.num_processes} process(es))")
        _, row = train(name, st, accelerator=acc)
        rows.append(row)
        if acc.is_main_process:
            cleanup(st, [name])
    acc.wait_for_everyone()
    return rows
