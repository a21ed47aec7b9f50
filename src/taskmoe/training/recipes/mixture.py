"""Recipe: mixture training (``taskmoe train mixture``): a run's experts fine-tuned together as a
routed mixture, with the seed's pruning.

The mixture (:class:`~taskmoe.experts.ensemble.RoutedMixture`, the c-BTM ensemble trained end to
end) reads each training window with the router's weights for it: ``log p(x_t) = log sum_e w_e
p_e(x_t)``, each expert run only on the rows that give it weight. :func:`train_joint` trains it on
the shared loop with a :class:`~taskmoe.experts.pruning.PruningCallback`: every training
sequence is a feed-forward, and an expert that contributes to fewer than ``min_contributions`` (3)
of a window of ``window`` (10) is pruned from the mixture at the window's end (its rows'
weights renormalise over the others).

The recipe is :class:`MixtureRecipeConfig` (``--config``/``--set`` through
:func:`taskmoe.config.config_from_flags`) plus :func:`setup` / :func:`train` / :func:`cleanup`.
:func:`train_mixture` is the command: route the corpus's windows with the run's router, train,
write every kept expert back to ``experts/<name>/`` (atomically; ``meta.mixture`` holds the
report) and record every pruned one under the manifest's ``pruned``, so the pipeline routes its
category to the remaining experts. Checkpoints go to ``<run>/train/mixture/`` (a rerun resumes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from taskmoe.config import Config, FlagPaths, check_min, doc
from taskmoe.errors import ConfigError, DataError
from taskmoe.experts.ensemble import RoutedMixture
from taskmoe.experts.expert_lm import load_expert, save_expert
from taskmoe.experts.pruning import ContributionTracker, PruningCallback, PruningConfig
from taskmoe.io import load_component
from taskmoe.manifest import load_manifest
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import TrainResult, train as train_loop
from taskmoe.training.losses import lm_cross_entropy
from taskmoe.training.recipes.experts import load_router, register_experts
from taskmoe.training.recipes.command import recipe_command
from taskmoe.training.recipes.routed_corpus import _windows

__all__ = ["MixtureRecipeConfig", "MixtureWindows", "mixture_loss", "train_joint", "route_windows", "setup", "train",
           "cleanup", "train_mixture"]


class MixtureWindows(torch.utils.data.Dataset):
    """Windows with per-window routing weights ``(E,)`` and confidences ``(E,)`` (the fallback)."""

    def __init__(self, windows: Sequence[torch.Tensor], weights: torch.Tensor, confidences: torch.Tensor | None = None) -> None:
        if len(windows) != weights.shape[0]:
            raise ConfigError(f"{len(windows)} windows but {weights.shape[0]} weight rows")
        self.windows = list(windows)
        self.weights = weights.float()
        self.confidences = (confidences if confidences is not None else weights).float()

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.windows[i], self.weights[i], self.confidences[i]

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        w = torch.stack([x for x, _, _ in items]).long()  # (B, T + 1)
        return {"input_ids": w[:, :-1], "targets": w[:, 1:], "weights": torch.stack([x for _, x, _ in items]),
                "confidences": torch.stack([x for _, _, x in items])}


def mixture_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token NLL of the mixture: ``-mean log sum_e w_e p_e(y_t)`` (the mixture returns log-probs)."""
    logp = model(batch["input_ids"], batch["weights"], batch["confidences"])  # (B, T, V)
    return lm_cross_entropy(logp, batch["targets"]), {"tokens": int(batch["targets"].numel())}


def train_joint(mixture: RoutedMixture, data: MixtureWindows, cfg: TrainConfig, *, pruning: PruningConfig | None = None,
                eval_data: MixtureWindows | None = None, out_dir: str | Path | None = None, resume: bool = True,
                accelerator: Any = None) -> tuple[TrainResult, PruningCallback]:
    """Fine-tune ``mixture`` end to end with pruning (module docstring); returns the run and the callback.

    Under DDP an expert may get no rows on a process, so the default accelerator asks DDP to
    tolerate unused parameters.
    """
    tracker = ContributionTracker(list(mixture.names), pruning or PruningConfig())
    cb = PruningCallback(tracker, on_prune=mixture.prune)
    loss = cb.wrap(mixture_loss, lambda b: mixture.contributions(b["weights"], b["confidences"]))
    if accelerator is None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cuda = torch.cuda.is_available()
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision if cuda else "no", cpu=not cuda,
                                  kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    res = train_loop(mixture, loss, data, cfg, eval_data=eval_data, eval_fn=mixture_loss, out_dir=out_dir, resume=resume,
                callbacks=[cb], accelerator=accelerator)
    return res, cb


def route_windows(router: Any, windows: Sequence[torch.Tensor], categories: Sequence[int],
                  batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, confidences)``, each ``(N, E)``: the router's mixing weights and confidences for
    every window, columns the given ``categories`` (the experts of the mixture)."""
    cols = list(categories)
    w, c = [], []
    for s in range(0, len(windows), batch):
        for d in router.route_batch([x.tolist() for x in windows[s : s + batch]]):
            sel = dict(zip(d.selected, d.weights))
            w.append([sel.get(k, 0.0) for k in cols])
            c.append([d.confidences[k] for k in cols])
    return torch.tensor(w, dtype=torch.float32), torch.tensor(c, dtype=torch.float32)


def _train_default() -> TrainConfig:
    return TrainConfig(max_steps=100, batch_size=8, lr=3e-4, warmup_steps=10, seed=0, progress=True, eval_every=0,
                       save_every=25)


@dataclass
class MixtureRecipeConfig(Config):
    """``train mixture``: the corpus windows, the pruning rule and the joint training run."""

    seq_len: int = doc(128, "tokens per training window of the corpus")
    source: Optional[str] = doc(None, "corpus source (None = the default corpus; see taskmoe data)")
    max_docs_per_domain: Optional[int] = doc(None, "read at most this many documents per domain")
    pruning: PruningConfig = field(default_factory=PruningConfig, metadata={"help": "the seed's pruning rule"})
    train: TrainConfig = field(default_factory=_train_default, metadata={"help": "the joint training run"})

    def validate(self) -> None:
        check_min(self, ("seq_len",), 2)


FLAGS: dict[str, FlagPaths] = {
    "steps": "train.max_steps", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "progress": "train.progress", "seq_len": "seq_len", "window": "pruning.window",
    "min_contributions": "pruning.min_contributions", "min_weight": "pruning.min_weight", "source": "source",
    "max_docs_per_domain": "max_docs_per_domain",
}
"""``train mixture`` flag -> the config path it sets (``steps`` also sets warmup and checkpoint spacing)."""


@dataclass
class MixtureSetup:
    run: Path
    manifest: Any
    router: Any
    shared: nn.Module
    names: list[str]
    cats: list[int]
    mixture: RoutedMixture
    data: MixtureWindows


def setup(run: Path, cfg: MixtureRecipeConfig) -> MixtureSetup:
    """Load the run's router and experts, route the corpus's windows, build the mixture."""
    from taskmoe.data.commands import get_corpus

    run = Path(run)
    res = load_manifest(run)
    router = load_router(run)
    router.unavailable = frozenset(res.pruned)
    cats = sorted(res.experts)
    if len(cats) < 2:
        raise ConfigError(f"{run}: mixture training needs at least 2 experts, the manifest maps {len(cats)}")
    shared = router.embedding.requires_grad_(False)
    names = [res.expert_name(i) for i in cats]
    experts = {n: load_expert(res.experts[i], shared).train() for n, i in zip(names, cats)}
    tok = router.tokenizer
    corpus = get_corpus(cfg.source, max_docs_per_domain=cfg.max_docs_per_domain, progress=bool(cfg.train.progress))
    windows = _windows(tok.encode_batch([d.text for d in corpus.train], allow_special=False), tok, cfg.seq_len)
    bs = cfg.train.batch_size
    if len(windows) < bs:
        raise DataError(f"the corpus gives {len(windows)} windows of {cfg.seq_len} tokens; need at least --batch-size {bs}")
    weights, conf = route_windows(router, windows, cats)
    torch.manual_seed(cfg.train.seed)
    return MixtureSetup(run, res, router, shared, names, cats, RoutedMixture(experts), MixtureWindows(windows, weights, conf))


def train(st: MixtureSetup, cfg: MixtureRecipeConfig) -> tuple[TrainResult, PruningCallback]:
    """The joint run with pruning (:func:`train_joint`); checkpoints in ``RUN/train/mixture``."""
    return train_joint(st.mixture, st.data, cfg.train, out_dir=st.run / "train" / "mixture", pruning=cfg.pruning)


def cleanup(st: MixtureSetup, result: TrainResult, cb: PruningCallback, seconds: float) -> list[dict[str, Any]]:
    """Write every kept expert back to ``experts/<name>/``, record the pruned ones in the manifest."""
    report = {"steps": result.steps, "first_loss": result.losses[0] if result.losses else None,
              "last_loss": result.losses[-1] if result.losses else None, "seconds": round(seconds, 1)}
    pruned = {n: {"stage": "mixture", **e} for e in cb.events for n in e["pruned"]}
    rows = []
    for n, i in zip(st.names, st.cats):
        if n in st.mixture.pruned:
            rows.append({"expert": n, "status": "pruned", **{k: pruned[n][k] for k in ("step", "window")}})
            continue
        meta = {**load_component(st.manifest.experts[i]).meta, "mixture": report}
        save_expert(st.mixture.experts[n].eval(), st.run / "experts" / n, st.shared, meta=meta)
        rows.append({"expert": n, "status": "kept", **report})
    register_experts(st.run, st.router, [], pruned={n: pruned[n] for n in st.mixture.pruned})
    return rows


def _schedule(a: dict[str, Any]) -> dict[str, Any]:
    """``--steps N`` also sets the warm-up (N // 10, at most 10) and checkpoints every N // 4 steps."""
    n = a["steps"]
    return {} if n is None else {"train.warmup_steps": min(10, n // 10), "train.save_every": max(1, n // 4)}


@recipe_command(MixtureRecipeConfig, FLAGS, recipe="mixture", derive=_schedule)
def train_mixture(run: Path = Path("runs/default"), *, cfg: MixtureRecipeConfig) -> list[dict[str, Any]]:
    """Fine-tune a run's trained experts together as a routed mixture, pruning the ones that rarely contribute.

    Every window of --seq-len tokens (default 128) of the corpus (the default corpus, or --source) is
    routed by the run's router and read by the mixture sum_e w_e p_e of its selected experts. An expert
    that contributes to fewer than --min-contributions of a window of --window training
    sequences is pruned (the seed's rule: 3 of 10); with --min-weight W a sequence counts only
    when it gives the expert a weight of at least W. Kept experts are written back to
    RUN/experts/NAME; pruned ones are recorded in RUN/taskmoe.json ('pruned') and their
    categories are routed to the remaining experts. Checkpoints in RUN/train/mixture (a rerun resumes).
    Defaults: 100 steps of 8 at lr 3e-4. --config reads a MixtureRecipeConfig JSON, the flags given
    override it, and --set PATH=VALUE (repeatable, e.g. --set pruning.keep_at_least=2) overrides any field last.
    """
    st = setup(run, cfg)
    t0 = time.perf_counter()
    result, cb = train(st, cfg)
    return cleanup(st, result, cb, time.perf_counter() - t0)
