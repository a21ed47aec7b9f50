"""Recipe: experts as LoRA adapters of a frozen backbone (``taskmoe train experts --backbone DIR``).

Setup / train / cleanup over the shared loop (:func:`taskmoe.training.loop.train`: accumulation,
resume, DDP, progress bar, metrics):

- **setup** (:func:`setup`): load the run's router (fitted on the backbone's tokenizer, any
  encoder; a backbone encoder gets the loaded backbone attached), load the backbone once,
  tokenise the corpus, route every document (:func:`taskmoe.experts.assign.route_documents`:
  a multi-category document goes to each selected expert, a fallback document to all) and pack
  each expert's documents into ``seq_len + 1`` windows;
- **train** (:func:`train_expert`): inject adapter ``name`` (rank ``r``, ``alpha``, on
  ``targets``), freeze everything else, and train an :class:`~taskmoe.experts.adapter_expert.AdapterExpert`
  (whose parameters are the adapter alone, so checkpoints in ``<run>/train/experts/<name>/``
  hold A and B only) on next-token cross-entropy;
- **cleanup** (:func:`register_backbone_experts`): save ``experts/<name>/`` in PEFT's layout
  (``adapter_config.json`` + ``adapter_model.safetensors``; ``base_model_name_or_path`` is the
  backbone folder) and register it in ``taskmoe.json``, whose ``meta.backbone`` names the backbone
  folder (stored once, never copied; relative to the run folder when it is inside it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from filelock import FileLock
from torch import nn

from taskmoe.config import Config, check, doc
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.experts.adapter_expert import AdapterExpert, adapter_parameters
from taskmoe.experts.assign import Assignment
from taskmoe.io import read_json
from taskmoe.manifest import MANIFEST_FILE, Manifest, Thresholds
from taskmoe.models.adapters import DEFAULT_TARGETS, inject_adapter, mark_only_adapter_trainable, save_adapter
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import make_accelerator, train
from taskmoe.training.losses import lm_cross_entropy
from taskmoe.training.recipes.experts import route_corpus

__all__ = ["AdapterExpertsConfig", "BackboneExpertsSetup", "setup", "train_expert", "register_backbone_experts",
           "window_loss", "backbone_ref", "train_backbone_experts",
           "check_adapter_fits", "experts_add"]


@dataclass
class AdapterExpertsConfig(Config):
    """LoRA shape, data windows and the training run of each adapter expert."""

    r: int = doc(16, "LoRA rank of each expert")
    alpha: float = doc(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    targets: list = doc(list(DEFAULT_TARGETS), "projection names the adapter wraps (PEFT target_modules)")
    seq_len: int = doc(256, "tokens per training window")
    val_windows: int = doc(32, "at most this many validation windows per expert (evenly spaced)")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=200, batch_size=4, lr=2e-4, warmup_steps=20, eval_every=0, save_every=100, eval_batches=8),
        metadata={"help": "the training run of each expert"})

    def validate(self) -> None:
        check(self.r >= 1, f"experts.r must be >= 1, got {self.r}")
        check(self.seq_len >= 2, f"experts.seq_len must be >= 2, got {self.seq_len}")
        check(bool(self.targets), "experts.targets must name at least one projection")
        check(self.val_windows >= 1, f"experts.val_windows must be >= 1, got {self.val_windows}")


@dataclass
class BackboneExpertsSetup:
    run_dir: Path
    backbone_dir: Path
    base: nn.Module
    router: Any
    assignment: Assignment
    data: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]  # name -> (train windows, val windows)
    cfg: AdapterExpertsConfig


def window_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy of ``(B, T + 1)`` windows: inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    ids = batch.long()
    ce = lm_cross_entropy(model(ids[:, :-1]).logits, ids[:, 1:])
    return ce, {"tokens": int(ids[:, 1:].numel()), "ce": ce.detach()}


def backbone_ref(run_dir: Path, backbone_dir: Path) -> str:
    """How the manifest names the backbone: relative to the run folder when inside it, else absolute."""
    b, r = Path(backbone_dir).resolve(), Path(run_dir).resolve()
    return os.path.relpath(b, r) if r in b.parents else str(b)


def load_run_router(run_dir: Path, base: nn.Module) -> Any:
    from taskmoe.router.encoders.backbone import attach_backbone
    from taskmoe.router.router import Router

    folder = Path(run_dir) / "router"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no router in the run folder (run `taskmoe route fit --backbone DIR "
                              f"--out {folder}` first)")
    router = Router.load(folder)
    if router.tokenizer is None or not hasattr(router.tokenizer, "chat_template"):
        raise CheckpointError(f"{folder}: the router was not fitted on a backbone's tokenizer; adapter experts read "
                              "the backbone's token ids (route fit --backbone DIR)")
    attach_backbone(router, base)
    return router


def setup(run_dir: Path, corpus: Any, backbone_dir: Path, cfg: AdapterExpertsConfig, experts: Sequence[str] | None = None,
          *, base: nn.Module | None = None, progress: bool = True, log: Callable[[str], None] = lambda s: None
          ) -> BackboneExpertsSetup:
    """Load router and backbone, route the corpus, build each expert's windows (module docstring)."""
    from taskmoe.models.backbones import load_backbone

    run_dir = Path(run_dir)
    if base is None:
        base, _ = load_backbone(backbone_dir)
    router = load_run_router(run_dir, base)
    if router.tokenizer.vocab_size > base.vocab_size:  # type: ignore[attr-defined]
        raise ConfigError(f"{run_dir / 'router'}: its tokenizer has {router.tokenizer.vocab_size} tokens, the backbone "
                          f"{backbone_dir} only {base.vocab_size}: fit the router on this backbone's tokenizer")
    rc = route_corpus(router, corpus, experts, progress=progress, log=log)
    data = {}
    for name in rc.names:
        n_docs, windows, val = rc.windows(name, router.tokenizer, cfg.seq_len, cfg.val_windows)
        data[name] = (windows, val)
        log(f"expert {name}: {n_docs} documents, {len(windows)} windows, {len(val)} validation windows")
    return BackboneExpertsSetup(run_dir, Path(backbone_dir), base, router, rc.assignment, data, cfg)


def train_expert(name: str, st: BackboneExpertsSetup, *, accelerator: Any = None, resume: bool = True,
                 save: bool = True) -> tuple[AdapterExpert, dict[str, Any]]:
    """Inject and train adapter ``name`` on its windows; save it as a PEFT folder (main process)."""
    cfg = st.cfg
    windows, val = st.data[name]
    acc = accelerator if accelerator is not None else make_accelerator(cfg.train)
    torch.manual_seed(cfg.train.seed)  # the same A init on every process and in every rerun
    if not adapter_parameters(st.base, name):  # a resumed process may have injected it already
        inject_adapter(st.base, name, r=cfg.r, alpha=cfg.alpha, targets=cfg.targets)
    mark_only_adapter_trainable(st.base, name)
    model = AdapterExpert(st.base, name)
    t0 = time.perf_counter()
    res = train(model, window_loss, windows, cfg.train, eval_data=val or None,
                out_dir=st.run_dir / "train" / "experts" / name, resume=resume, accelerator=acc)
    for p in model.parameters():
        p.requires_grad_(False)
    last = res.eval_history[-1] if res.eval_history else {}
    row: dict[str, Any] = {
        "expert": name, "documents": len(st.assignment.docs.get(name, range(st.assignment.total))),
        "windows": len(windows), "steps": res.steps,
        "train_loss": res.losses[-1] if res.losses else None,
        "val_ppl": float(torch.tensor(last["eval_ce"]).exp()) if "eval_ce" in last else None,
        "adapter_parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if save and acc.is_main_process:
        row["folder"] = str(save_adapter(st.base, name, st.run_dir / "experts" / name,
                                         base_model_name_or_path=str(st.backbone_dir.resolve())))
    acc.wait_for_everyone()
    return model, row


def register_backbone_experts(run_dir: Path, categories: Sequence[str], backbone_dir: Path, names: Sequence[str],
                              folders: dict[str, str] | None = None, policy: Any = None) -> Path:
    """Map each name's category to ``experts/<name>`` (or ``folders[name]``) in ``taskmoe.json``, under a lock;
    the manifest's ``meta.backbone`` names the backbone folder."""
    from taskmoe.models.backbones import read_backbone_config

    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    bcfg = read_backbone_config(backbone_dir)
    ref = backbone_ref(run_dir, backbone_dir)
    with FileLock(str(run_dir / f".{MANIFEST_FILE}.lock")):
        if path.is_file():
            m = Manifest.from_dict(read_json(path), source=str(path))
            if m.meta.get("backbone") not in (None, ref):
                raise ConfigError(f"{path}: the run's experts are adapters of {m.meta['backbone']!r}, not {ref!r}")
        else:
            th = Thresholds() if policy is None else Thresholds(t_C_base=policy.t_C_base, k=policy.k, t_CT=policy.t_CT)
            m = Manifest(tokenizer="router/tokenizer.json", router="router", vocab_size=bcfg.vocab_size,
                         d_model=bcfg.hidden_size, thresholds=th)
        experts = dict(m.experts)
        for n in names:
            experts[str(list(categories).index(n))] = (folders or {}).get(n, f"experts/{n}")
        m = m.replace(experts=dict(sorted(experts.items(), key=lambda kv: int(kv[0]))), meta={**m.meta, "backbone": ref})
        return m.save(run_dir)


def train_backbone_experts(run_dir: Path, corpus: Any, backbone_dir: Path, cfg: AdapterExpertsConfig,
                           experts: Sequence[str] | None = None, *, base: nn.Module | None = None, progress: bool = True,
                           log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """setup -> train each expert -> save and register it (the whole recipe)."""
    acc = make_accelerator(cfg.train)
    st = setup(run_dir, corpus, backbone_dir, cfg, experts, base=base, progress=progress and acc.is_main_process,
               log=log if acc.is_main_process else (lambda s: None))
    rows = []
    for name in st.data:
        log(f"training adapter expert {name} ({acc.num_processes} process(es))")
        _, row = train_expert(name, st, accelerator=acc)
        rows.append(row)
        if acc.is_main_process:
            register_backbone_experts(st.run_dir, st.router.categories, st.backbone_dir, [name], policy=st.router.policy)
    acc.wait_for_everyone()
    return rows


def check_adapter_fits(peft_dir: Path, backbone_dir: Path) -> dict[str, Any]:
    """Load a PEFT adapter into a shape-only (meta-device) copy of the backbone: CheckpointError naming
    each module or shape that does not fit; returns the adapter's rank, alpha and target modules."""
    from taskmoe.models.adapters import ADAPTER_CONFIG, is_peft_adapter_dir, load_adapter
    from taskmoe.models.backbones import llama_lm, read_backbone_config

    peft_dir = Path(peft_dir)
    if not is_peft_adapter_dir(peft_dir):
        raise CheckpointError(f"{peft_dir}: not a PEFT adapter folder (needs adapter_config.json and "
                              "adapter_model.safetensors)")
    with torch.device("meta"):
        shell = llama_lm(read_backbone_config(backbone_dir), init=False)
    load_adapter(shell, peft_dir, name="candidate")
    cfg = read_json(peft_dir / ADAPTER_CONFIG)
    return {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules"),
            "base_model_name_or_path": cfg.get("base_model_name_or_path")}


def experts_add(
    name: str,
    peft_dir: Path,
    run: Path = Path("runs/quickstart"),
    category: str | None = None,
) -> dict[str, Any]:
    """Register a PEFT LoRA adapter trained elsewhere as the expert of a router category: taskmoe experts add NAME PEFT_DIR.

    RUN must be a backbone system (its taskmoe.json names meta.backbone). The adapter is checked
    against the backbone (module names, ranks and shapes; DoRA, biases and other non-LoRA options
    are refused), copied to RUN/experts/NAME/ and mapped to --category (default: NAME, when NAME is
    a router category); the category's previous expert is replaced.
    """
    from taskmoe.inference.backbone_loader import backbone_dir
    from taskmoe.io import atomic_dir, load_component
    from taskmoe.manifest import load_manifest
    from taskmoe.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    res = load_manifest(run)
    if not res.manifest.meta.get("backbone"):
        raise ConfigError(f"{Path(run) / MANIFEST_FILE}: not a backbone system (no meta.backbone); PEFT adapters can only "
                          "be experts of a run whose experts are adapters of a backbone")
    bdir = backbone_dir(res)
    categories = list(load_component(res.router).config["categories"])
    cat = category or name
    if cat not in categories:
        raise ConfigError(f"category {cat!r} is not a router category of {run} (categories: {categories}); pass --category")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"expert name {name!r} must be a plain folder name")
    info = check_adapter_fits(Path(peft_dir), bdir)

    def build(tmp: Path) -> None:
        import shutil

        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(Path(peft_dir) / f, tmp / f)

    atomic_dir(Path(run) / "experts" / name, build)
    previous = res.manifest.experts.get(str(categories.index(cat)))
    register_backbone_experts(Path(run), categories, bdir, [cat], folders={cat: f"experts/{name}"})
    return {"expert": name, "category": cat, "replaced": previous, "folder": str(Path(run) / "experts" / name), **info}
