"""``taskmoe.load(path)``: a run folder (validated manifest) -> a ready :class:`~taskmoe.inference.pipeline.System`.

Order, each step failing with :class:`~taskmoe.errors.CheckpointError` naming the file:

1. :func:`taskmoe.manifest.load_manifest` validates ``taskmoe.json`` (format version, every
   named path exists, vocabulary size and embedding width agree across components);
2. the tokenizer, then the router; the manifest's thresholds (t_C_base, k, t_CT) are the
   deployed routing policy and replace the router's own;
3. every router category must have an expert in the manifest (and nothing else may be named),
   except the categories whose expert training pruned (``manifest.pruned``): the router routes
   them to the remaining experts (``router.unavailable``, :mod:`taskmoe.router.availability`);
4. the expert store is *lazy*: experts are registered, not read; its loader rebuilds an
   expert around the router's embedding table (one shared ``nn.Embedding``: experts and the
   summarizer saved without the table get it injected; a component that stored its own
   fine-tuned table keeps it);
5. the cross-talk runner: the run's trained ``crosstalk/`` folder if the manifest names one
   (:class:`taskmoe.crosstalk.runner.CrosstalkRunner`), else an *untrained* runner in which the
   flagged experts talk with their base weights (no adapters; the dialogue may hold
   ``2 * draft_tokens`` tokens, the two drafts' length), so every system can cross-talk; the
   trace says which (``crosstalk.adapters``) and ``meta.pipeline.crosstalk = false`` switches it off;
6. the summarizer (if any), its adapters (``manifest.adapters``), the intent head
   (``<summarizer>/intent`` when present) and the pipeline settings (``meta.pipeline``: draft
   length, decoding, disagreement threshold).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from taskmoe.errors import CheckpointError, ConfigError, DataError
from taskmoe.experts.expert_lm import expert_loader
from taskmoe.experts.store import ExpertStore
from taskmoe.inference.pipeline import CrosstalkRunner, PipelineConfig, System
from taskmoe.io import load_component
from taskmoe.manifest import ResolvedManifest, load_manifest
from taskmoe.models.checkpoint import load_lm
from taskmoe.layers.lora import load_adapter
from taskmoe.router.policy import PolicyConfig
from taskmoe.router.persist import load_shared_embedding
from taskmoe.router.router import Router
from taskmoe.summarizer.intent import IntentClassifier

__all__ = ["load_system", "INTENT_DIR"]

INTENT_DIR = "intent"


def _lm(folder: Path, embedding: nn.Embedding, kind: str | tuple[str, ...] | None = None) -> nn.Module:
    """Load an LM component, injecting the shared table unless the component stored its own."""
    comp = load_component(folder, kind)
    own = bool(comp.config.get("includes_embedding", True))
    return load_lm(folder, kind, embedding=None if own else embedding).eval()


def _expert_names(res: ResolvedManifest, router: Router) -> dict[str, str]:
    """category name -> expert name (the expert folder's name), checking coverage both ways."""
    path = res.run_dir / "taskmoe.json"
    k = router.n_categories
    extra = sorted(i for i in [*res.experts, *res.pruned] if not 0 <= i < k)
    if extra:
        raise CheckpointError(f"{path}: experts named for categories {extra}, but the router has categories 0..{k - 1}")
    if len(res.pruned) >= k:
        raise CheckpointError(f"{path}: every router category's expert is listed as pruned")
    missing = [f"{i} ({router.categories[i]})" for i in range(k) if i not in res.experts and i not in res.pruned]
    if missing:
        raise CheckpointError(f"{path}: router categories {missing} have no expert in 'experts' "
                              f"(it maps {sorted(res.experts)})")
    names: dict[str, str] = {}
    seen: dict[str, Path] = {}
    for i in sorted(res.experts):
        folder = res.experts[i]
        name = res.expert_name(i)
        if name in seen and seen[name] != folder:
            raise CheckpointError(f"{path}: two different expert folders are both named '{name}' ({seen[name]}, {folder})")
        seen[name] = folder
        names[router.categories[i]] = name
    return names


def load_system(
    path: str | Path,
    *,
    max_experts: int | None = None,
    max_bytes: int | None = None,
    crosstalk: CrosstalkRunner | None = None,
    config: PipelineConfig | None = None,
    device: str = "cpu",
    mode: str | None = None,
    weights: str = "fp32",
) -> System:
    """Load the trained system in run folder ``path`` (see the module docstring).

    ``mode``: ``"summarizer"`` or ``"ensemble"`` (the confidence-weighted mixture of the selected
    experts, no summarizer loaded); None = the run's own (summarizer when it has one). A run without
    a summarizer cannot load in summarizer mode (ConfigError). ``weights``: ``"fp32"``, or ``"int4"`` for a
    backbone system (its backbone's projections in 4 bits, :mod:`taskmoe.models.quantize`).

    ``max_experts`` / ``max_bytes`` bound the resident experts (LRU); ``crosstalk`` is the
    cross-talk runner to call when the router flags a pair (default: the run's trained
    ``crosstalk/`` folder when the manifest names one, else the untrained base-weights runner);
    ``config`` overrides the pipeline settings stored in the manifest.
    """
    from taskmoe.data.tokenizer import Tokenizer

    res = load_manifest(path)
    m = res.manifest
    if mode not in (None, "summarizer", "ensemble"):
        raise ConfigError(f"mode must be 'summarizer' or 'ensemble', got {mode!r}")
    if mode == "summarizer" and res.summarizer is None:
        raise ConfigError(f"{res.run_dir}: this run has no summarizer, so it cannot load in summarizer mode")
    if m.meta.get("backbone"):  # experts are LoRA adapters of a pretrained backbone
        from taskmoe.inference.backbone_loader import load_backbone_system

        return load_backbone_system(res, max_experts=max_experts, max_bytes=max_bytes, config=config, device=device,
                                    summarizer=mode != "ensemble", weights=weights)
    if weights != "fp32":
        raise ConfigError(f"{res.run_dir}: weights={weights!r} applies to backbone systems; this run's experts are "
                          "small models trained from scratch (load it with weights='fp32')")
    mpath = res.run_dir / "taskmoe.json"
    try:
        tok = Tokenizer.load(res.tokenizer)
    except DataError as e:
        raise CheckpointError(str(e)) from e
    if tok.vocab_size > m.vocab_size:
        raise CheckpointError(f"{res.tokenizer}: tokenizer has {tok.vocab_size} tokens but the manifest's shared "
                              f"vocabulary has {m.vocab_size} (vocabulary size mismatch)")
    router = Router.load(res.router, tokenizer=tok)
    th = m.thresholds
    router.policy = PolicyConfig(t_C_base=th.t_C_base, k=th.k, t_CT=th.t_CT)
    emb = router.embedding if router.embedding is not None else load_shared_embedding(res.router)
    emb.requires_grad_(False)
    if (emb.num_embeddings, emb.embedding_dim) != (m.vocab_size, m.d_model):
        raise CheckpointError(f"{res.router}: shared embedding is {emb.num_embeddings} x {emb.embedding_dim}, manifest "
                              f"{mpath} says vocab_size x d_model = {m.vocab_size} x {m.d_model}")
    expert_of = _expert_names(res, router)
    router.unavailable = frozenset(res.pruned)
    store = ExpertStore(expert_loader(emb, device=device), max_experts=max_experts, max_bytes=max_bytes,
                        exclude_shared=[emb.weight])
    for cat, name in expert_of.items():
        store.register(name, res.experts[router.categories.index(cat)])
    summarizer = intent = None
    if res.summarizer is not None and mode != "ensemble":
        summarizer = _lm(res.summarizer, emb).to(device)
        for name, folder in res.adapters.items():
            load_adapter(summarizer, folder, name=name)
        if (res.summarizer / INTENT_DIR).is_dir():
            intent = IntentClassifier.load(res.summarizer / INTENT_DIR)
    elif res.adapters and res.summarizer is None:
        raise CheckpointError(f"{mpath}: adapters {sorted(res.adapters)} are listed but there is no summarizer")
    if config is None:
        raw: Any = m.meta.get("pipeline", {})
        try:
            config = PipelineConfig.from_dict(raw, source=f"{mpath}: meta.pipeline")
        except ConfigError as e:
            msg = str(e)
            raise CheckpointError(msg if str(mpath) in msg else f"{mpath}: meta.pipeline: {msg}") from e
    if crosstalk is None:
        from taskmoe.crosstalk.dialogue import DialogueConfig
        from taskmoe.crosstalk.runner import CrosstalkRunner as FolderRunner

        crosstalk = (FolderRunner.from_folder(res.crosstalk, tok) if res.crosstalk is not None
                     else FolderRunner(tok, DialogueConfig(max_new_tokens=2 * config.draft_tokens)))
    try:
        return System(tok, router, store, expert_of, summarizer=summarizer, intent=intent, crosstalk=crosstalk,
                      config=config, source=res.run_dir, meta=m.meta)
    except ConfigError as e:
        raise CheckpointError(f"{mpath}: {e}") from e
