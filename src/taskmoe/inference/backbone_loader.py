"""``taskmoe.load(run)`` for a backbone system: one frozen backbone, experts as its LoRA adapters.

A run whose manifest names ``meta.backbone`` (see :mod:`taskmoe.training.recipes.backbone_experts`)
loads as:

1. the backbone folder (relative to the run folder, or absolute), once, with
   :func:`~taskmoe.models.backbones.load_backbone` (safetensors only), and its tokenizer from
   the manifest's ``tokenizer`` (the router folder's copy of the backbone's tokenizer);
2. the router, with the manifest's thresholds; a backbone encoder reads the loaded backbone
   (:func:`~taskmoe.router.encoders.backbone.attach_backbone`, adapters off);
3. the expert store over PEFT adapter folders: lazy as for small experts, each expert loaded
   into the shared backbone on first use (:func:`~taskmoe.experts.adapter_expert.adapter_expert_loader`)
   and charged its adapter bytes only; pruned categories route to the remaining experts;
4. the summarizer, when the manifest names one (:mod:`taskmoe.training.recipes.backbone_summarizer`):
   its fusion adapter (``summarizer/``, PEFT files) and its coding adapter (``adapters.code``) are
   loaded into the same backbone as ``summarizer_fusion`` / ``summarizer_code`` and wrapped as a
   :class:`~taskmoe.summarizer.backbone_summarizer.BackboneSummarizer`; the intent head from
   ``summarizer/intent``; the prompt format is
   :class:`~taskmoe.summarizer.backbone_format.BackboneFusionFormat` (the backbone's chat template).
   The system then answers in summarizer mode (Route -> Draft -> Crosstalk -> Assess -> Fuse; no
   cross-talk runner is configured, so a flagged pair's trace says so), with the disagreement
   threshold calibrated on validation (``meta.pipeline.disagreement``);
5. the pipeline settings (``meta.pipeline``). Without a summarizer the system answers in
   experts-only mode (the confidence-weighted ensemble of the selected experts,
   :class:`~taskmoe.inference.rowwise.EnsembleLM`), each expert reading the prompt inside the
   backbone's chat template.

The loaded backbone is ``system.backbone`` (the summarizer recipe trains its adapters into it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskmoe.errors import CheckpointError, ConfigError, DataError
from taskmoe.experts.adapter_expert import adapter_expert_loader
from taskmoe.experts.store import ExpertStore
from taskmoe.inference.pipeline import PipelineConfig, System
from taskmoe.manifest import ResolvedManifest
from taskmoe.router.policy import PolicyConfig

__all__ = ["backbone_dir", "load_backbone_system"]


def backbone_dir(res: ResolvedManifest) -> Path:
    """The backbone folder a manifest's ``meta.backbone`` names (CheckpointError when missing)."""
    ref = Path(str(res.manifest.meta["backbone"]))
    folder = ref if ref.is_absolute() else res.run_dir / ref
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{res.run_dir / 'taskmoe.json'}: meta.backbone {str(ref)!r} is not a backbone folder "
                              f"({folder} has no config.json; recreate it with `taskmoe backbone import --out {folder}`)")
    return folder


def _summarizer(res: ResolvedManifest, base: Any, tok: Any, expert_names: Any) -> tuple[Any, Any]:
    """(BackboneSummarizer, intent head or None) of the manifest's summarizer folder."""
    from taskmoe.layers.lora import set_adapter
    from taskmoe.models.adapters import is_peft_adapter_dir, load_adapter
    from taskmoe.models.switch_lock import switch_lock
    from taskmoe.summarizer.backbone_summarizer import FUSION_ADAPTER, BackboneSummarizer, adapter_name
    from taskmoe.summarizer.intent import IntentClassifier

    mpath = res.run_dir / "taskmoe.json"
    folder = res.summarizer
    assert folder is not None
    if not is_peft_adapter_dir(folder):
        raise CheckpointError(f"{mpath}: summarizer {folder} is not a PEFT adapter folder (a backbone system's "
                              "summarizer is its fusion adapter; retrain it with `taskmoe train summarizer`)")
    taken = sorted({FUSION_ADAPTER, *map(adapter_name, res.adapters)} & set(expert_names))
    if taken:
        raise CheckpointError(f"{mpath}: expert names {taken} collide with the summarizer's adapter names")
    with switch_lock(base):
        load_adapter(base, folder, name=FUSION_ADAPTER)
        for name, afolder in res.adapters.items():
            load_adapter(base, afolder, name=adapter_name(name))
        set_adapter(base, None)  # the shared backbone's own forward stays the base model
    intent = IntentClassifier.load(folder / "intent") if (folder / "intent").is_dir() else None
    return BackboneSummarizer(base, FUSION_ADAPTER, list(res.adapters)), intent


def load_backbone_system(res: ResolvedManifest, *, max_experts: int | None = None, max_bytes: int | None = None,
                         config: PipelineConfig | None = None, device: str = "cpu", summarizer: bool = True,
                         weights: str = "fp32", **_: Any) -> System:
    """Load a backbone system (module docstring) from an already validated manifest; ``summarizer=False``
    loads it experts-only even when the run has a summarizer (its recipe drafts with that); ``weights="int4"``
    keeps the shared backbone's projections in 4 bits (the experts stay float32 LoRA on top)."""
    from taskmoe.data.backbone_tokenizer import BackboneTokenizer
    from taskmoe.inference.loader import _expert_names
    from taskmoe.models.backbones import load_backbone
    from taskmoe.router.encoders.backbone import attach_backbone
    from taskmoe.router.router import Router

    m = res.manifest
    mpath = res.run_dir / "taskmoe.json"
    base, _ = load_backbone(backbone_dir(res), device=device, weights=weights)
    base.requires_grad_(False)
    try:
        tok = BackboneTokenizer.load(res.tokenizer)
    except DataError as e:
        raise CheckpointError(str(e)) from e
    if (base.vocab_size, base.d_model) != (m.vocab_size, m.d_model):
        raise CheckpointError(f"{mpath}: vocab_size x d_model = {m.vocab_size} x {m.d_model}, but the backbone is "
                              f"{base.vocab_size} x {base.d_model}")
    router = Router.load(res.router, tokenizer=tok)
    th = m.thresholds
    router.policy = PolicyConfig(t_C_base=th.t_C_base, k=th.k, t_CT=th.t_CT)
    attach_backbone(router, base)
    expert_of = _expert_names(res, router)
    router.unavailable = frozenset(res.pruned)
    store = ExpertStore(adapter_expert_loader(base), max_experts=max_experts, max_bytes=max_bytes,
                        exclude_shared=list(base.parameters()))
    for cat, name in expert_of.items():
        store.register(name, res.experts[router.categories.index(cat)])
    if config is None:
        try:
            config = PipelineConfig.from_dict(m.meta.get("pipeline", {}), source=f"{mpath}: meta.pipeline")
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
    summ = intent = fmt = None
    if summarizer and res.summarizer is not None:
        from taskmoe.summarizer.backbone_format import BackboneFusionFormat

        summ, intent = _summarizer(res, base, tok, expert_of.values())
        fmt = BackboneFusionFormat(tok, max_len=config.max_len)
    elif res.adapters and res.summarizer is None:
        raise CheckpointError(f"{mpath}: adapters {sorted(res.adapters)} are listed but there is no summarizer")
    try:
        system = System(tok, router, store, expert_of, summarizer=summ, intent=intent, config=config,
                        source=res.run_dir, meta=m.meta, fmt=fmt)
    except ConfigError as e:
        raise CheckpointError(f"{mpath}: {e}") from e
    system.backbone = base  # type: ignore[attr-defined]
    return system
