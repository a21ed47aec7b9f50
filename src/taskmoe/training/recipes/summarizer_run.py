"""Train the summarizer of a run folder (``taskmoe train summarizer``) and calibrate the pipeline.

The fusion recipe itself (:mod:`taskmoe.training.recipes.summarizer`: pairs -> drafts -> train
-> coding adapter -> intent head) takes every part injected; this file assembles those parts
from a run folder that already has a router and experts, then registers the result:

- **setup**: the manifest (router, experts), the router (its learned encoder owns the shared
  embedding table and the tokenizer), an :class:`~taskmoe.experts.store.ExpertStore` over the
  experts, and a :class:`~taskmoe.summarizer.drafts.Drafter` whose draft function is the
  pipeline's own (:func:`taskmoe.inference.pipeline.draft_generator`), so the summarizer trains
  on exactly the drafts it will read at inference. Draft cache keys include each expert's
  weights fingerprint.
- **train**: a fresh ``summarizer_lm`` around the shared table, then the recipe's ``run``
  (resumes from ``<run>/train_summarizer`` checkpoints and the draft cache).
- **register**: ``summarizer``, ``adapters.code`` and ``meta.pipeline`` (draft length and fusion
  budget the summarizer was trained with) in ``taskmoe.json``.
- **calibrate** (:func:`calibrate_run`): the disagreement threshold with the best F1 on natural
  vs planted draft pairs of held-out prompts (:func:`taskmoe.eval.fusion.calibrate_disagreement`),
  written to ``meta.pipeline.disagreement.threshold`` with its precision/recall in
  ``meta.disagreement_calibration``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from taskmoe.config import FlagPaths
from taskmoe.errors import CheckpointError, DataError
from taskmoe.eval.fusion import calibrate_disagreement, heldout_pairs
from taskmoe.experts.expert_lm import expert_loader
from taskmoe.experts.store import ExpertStore
from taskmoe.inference.loader import load_system
from taskmoe.inference.pipeline import PipelineConfig, draft_generator
from taskmoe.io import read_json
from taskmoe.manifest import MANIFEST_FILE, Manifest, load_manifest
from taskmoe.models.builders import summarizer_lm
from taskmoe.models.config import LMConfig, SummarizerLMConfig
from taskmoe.router.router import Router
from taskmoe.summarizer.drafts import Drafter, folder_fingerprint
from taskmoe.training.recipes.command import recipe_command
from taskmoe.training.recipes.summarizer import ADAPTER, SummarizerRecipeConfig, run as run_recipe

__all__ = ["SUMMARIZER_LM", "update_manifest", "summarizer_drafter", "train_summarizer_run", "calibrate_run",
           "train_summarizer"]

SUMMARIZER_LM = SummarizerLMConfig(n_layers=4)
"""Default summarizer shape; vocab_size and d_model always come from the shared table."""


def update_manifest(run_dir: Path, **changes: Any) -> Manifest:
    """Read ``taskmoe.json``, apply ``changes`` (``meta`` is merged key by key), save it atomically."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no manifest (train the router and experts of this run first)")
    m = Manifest.from_dict(read_json(path), source=str(path))
    meta = {**m.meta, **changes.pop("meta", {})}
    m = m.replace(meta=meta, **changes)
    m.save(run_dir)
    return m


def summarizer_drafter(run_dir: Path, cfg: SummarizerRecipeConfig, pipeline: PipelineConfig) -> tuple[Router, Drafter]:
    """The run's router and a Drafter over its experts with the pipeline's draft function."""
    res = load_manifest(run_dir)
    router = Router.load(res.router)
    if router.embedding is None or router.tokenizer is None:
        raise CheckpointError(f"{res.router}: the summarizer needs a router with a learned (shared) embedding table "
                              "and its tokenizer.json")
    router.unavailable = frozenset(res.pruned)  # pruned in training: routed to the remaining experts
    missing = [c for i, c in enumerate(router.categories) if i not in res.experts and i not in res.pruned]
    if missing:
        raise CheckpointError(f"{res.run_dir / MANIFEST_FILE}: categories {missing} have no expert yet "
                              "(run `taskmoe train experts` first)")
    store = ExpertStore(expert_loader(router.embedding), exclude_shared=[router.embedding.weight])
    expert_of, prints = {}, {}
    for i, folder in sorted(res.experts.items()):
        name = res.expert_name(i)
        store.register(name, folder)
        expert_of[router.categories[i]] = name
        prints[name] = folder_fingerprint(folder)
    tok = router.tokenizer
    drafter = Drafter(router, store, draft_generator(tok.eos_id, pipeline.draft_repetition_penalty), bos_id=tok.bos_id,
                      max_new_tokens=cfg.draft_tokens, batch_size=cfg.draft_batch_size, expert_of=expert_of,
                      fingerprints=prints, settings={"repetition_penalty": pipeline.draft_repetition_penalty})
    return router, drafter


def train_summarizer_run(run_dir: Path, corpus: Any, cfg: SummarizerRecipeConfig, *, lm: LMConfig = SUMMARIZER_LM,
                         pipeline: PipelineConfig | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train the summarizer, its coding adapter and intent head for ``run_dir``; register them."""
    run_dir = Path(run_dir)
    pipeline = (pipeline or PipelineConfig()).replace(draft_tokens=cfg.draft_tokens, max_len=cfg.max_len,
                                                      adapter=ADAPTER)
    router, drafter = summarizer_drafter(run_dir, cfg, pipeline)
    emb = router.embedding
    emb.requires_grad_(False)
    torch.manual_seed(seed)
    model = summarizer_lm(SummarizerLMConfig.coerce(lm).replace(vocab_size=emb.num_embeddings, d_model=emb.embedding_dim), emb)
    report = run_recipe(model, corpus, router.tokenizer, drafter, run_dir, cfg, progress=progress)
    update_manifest(run_dir, summarizer="summarizer", adapters={ADAPTER: f"summarizer/adapters/{ADAPTER}"},
                    meta={"pipeline": pipeline.to_dict(), "summarizer": {"lm": model.config.to_dict(), "recipe": cfg.to_dict()}})
    return report


def calibrate_run(run_dir: Path, corpus: Any, *, prompt_tokens: int = 64, target_tokens: int = 48,
                  per_domain: int | None = 50, seed: int = 0) -> dict[str, Any]:
    """Choose the disagreement threshold on the validation split and store it in the manifest.

    Needs held-out prompts with domain labels (two domains, two documents in one of them); without
    them the configured threshold is kept and ``meta.disagreement_calibration.skipped`` says why.
    """
    system = load_system(run_dir)
    docs = corpus.validation or corpus.test
    try:
        pairs = heldout_pairs(docs, system.tokenizer, prompt_tokens=prompt_tokens, target_tokens=target_tokens,
                              per_domain=per_domain)
        cal = calibrate_disagreement(system, pairs, seed=seed)
    except DataError as e:  # e.g. a corpus without domain labels: keep the configured threshold, say why
        cal = {"threshold": system.config.disagreement.threshold, "skipped": str(e)}
        update_manifest(run_dir, meta={"disagreement_calibration": cal})
        return cal
    pipe = system.config.replace(disagreement=system.config.disagreement.replace(threshold=float(cal["threshold"])))
    update_manifest(run_dir, meta={"pipeline": pipe.to_dict(), "disagreement_calibration": cal})
    return cal


FLAGS: dict[str, FlagPaths] = {
    "steps": "train.max_steps", "adapter_steps": "adapter_train.max_steps", "batch_size": "train.batch_size",
    "lr": "train.lr", "draft_tokens": "draft_tokens", "prompt_tokens": "prompt_tokens",
    "target_tokens": "target_tokens", "max_len": "max_len", "seed": ("train.seed", "adapter_train.seed"),
    "progress": ("train.progress", "adapter_train.progress"),
}
"""``train summarizer`` flag -> the config path(s) it sets (``--seed`` / ``--progress`` set both runs)."""


def _backbone_variant(a: dict[str, Any]) -> Any:
    """On a backbone system (``meta.backbone``) the config is a BackboneSummarizerConfig (same flag paths)."""
    manifest = Path(a["run"]) / MANIFEST_FILE
    if not (manifest.is_file() and (read_json(manifest).get("meta") or {}).get("backbone")):
        return None
    from taskmoe.training.recipes.backbone_summarizer import BackboneSummarizerConfig

    return BackboneSummarizerConfig, FLAGS


@recipe_command(SummarizerRecipeConfig, FLAGS, recipe="train summarizer", variant=_backbone_variant)
def train_summarizer(run: Path = Path("runs/default"), source: Optional[str] = None,
                     max_docs_per_domain: Optional[int] = None, n_layers: int = SUMMARIZER_LM.n_layers,
                     calibrate: bool = True, *, cfg: Any) -> dict[str, Any]:
    """Train the summarizer of a run folder that has a router and experts (+ code adapter, intent head).

    Fusion pairs come from the corpus (default, or --source): document prefix -> true
    continuation, dialogue turn -> reply. The run's router selects experts for every prompt, the
    experts draft (cached in RUN/drafts.jsonl), and an SSM summarizer sharing the router's
    embedding learns to write the target from the prompt and the drafts. Then a coding LoRA
    adapter is trained on the code domain and an intent head (code vs other) is fitted on the
    summarizer's pooled prompt states. --calibrate picks the disagreement threshold on
    validation prompts (natural vs planted draft conflicts). --config reads a
    SummarizerRecipeConfig JSON; the flags given override it, and --set PATH=VALUE (repeatable,
    e.g. --set adapter_rank=4 --set train.lr=3e-4) overrides any field last. Writes
    RUN/summarizer/ and registers it in RUN/taskmoe.json; a rerun resumes training and reuses
    cached drafts. On a backbone system (experts are LoRA adapters of a backbone) the summarizer is
    a fusion LoRA adapter of that backbone with a coding adapter trained from it
    (taskmoe.training.recipes.backbone_summarizer; --config / --set then read a
    BackboneSummarizerConfig, --n-layers does not apply).
    """
    from taskmoe.data.commands import get_corpus

    if not isinstance(cfg, SummarizerRecipeConfig):  # a backbone system: its experts are adapters of a backbone
        from taskmoe.training.recipes.backbone_summarizer import train_from_cli

        return train_from_cli(Path(run), source, max_docs_per_domain, cfg, calibrate)
    seed, progress = cfg.train.seed, cfg.train.progress
    corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress)
    report = train_summarizer_run(Path(run), corpus, cfg, lm=SUMMARIZER_LM.replace(n_layers=n_layers),
                                  seed=seed, progress=progress)
    row: dict[str, Any] = {"run": str(run), **{k: v for k, v in report.items() if not isinstance(v, (dict, list))}}
    if calibrate:
        cal = calibrate_run(Path(run), corpus, prompt_tokens=cfg.prompt_tokens, target_tokens=cfg.target_tokens, seed=seed)
        row.update({f"disagreement_{k}": v for k, v in cal.items() if k in ("threshold", "precision", "recall", "f1", "skipped")})
    return row
