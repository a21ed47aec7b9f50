"""The manifest of a trained IMoE system: ``runs/<name>/taskmoe.json``.

A trained system is a folder::

    taskmoe.json      this manifest
    tokenizer.json    the shared vocabulary
    router/           component: encoder (owns the shared embedding table), classifier, ...
    experts/<name>/   one component per expert (the embedding table is not repeated), or, in a
                      backbone system (``meta.backbone`` names the backbone folder), a PEFT LoRA
                      adapter folder of that backbone
    summarizer/       component (+ adapters/code/ for the coding LoRA adapter)
    crosstalk/        optional: discriminator and cross-talk LoRA adapters
    reports/          metrics and plots

The manifest names every part by a path relative to the run folder, maps each router category
to its expert, and carries the routing thresholds. :func:`load_manifest` validates it before
anything heavy is loaded: the format version, that every named file exists, and that every
component agrees on the vocabulary size and embedding width of the shared table. Each failure
names the file and the mismatch.

Loading is read-only: a component left between the two renames of an interrupted save
(``NAME`` missing, ``NAME.aside-*`` present) resolves to its aside copy
(:func:`taskmoe.io.resolve_saved`, with a warning naming ``taskmoe doctor``).

Pruned experts (``pruned``: category -> what the training run recorded when it pruned the
category's expert, see :mod:`taskmoe.experts.pruning`) need no expert folder; the loader routes
their categories to the remaining experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskmoe.config import Config, check, check_min, doc
from taskmoe.errors import CheckpointError
from taskmoe.io import atomic_write_json, load_component, read_json, resolve_saved
from taskmoe.router.policy import PolicyConfig

MANIFEST_FILE = "taskmoe.json"
MANIFEST_VERSION = 1


def manifest_lock(run_dir: str | Path) -> Any:
    """The exclusive lock writers of ``run_dir/taskmoe.json`` hold while they read-modify-write it
    (a :class:`filelock.FileLock` on ``.taskmoe.json.lock``; jobs training different experts may
    register them at the same time)."""
    from filelock import FileLock

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return FileLock(str(Path(run_dir) / f".{MANIFEST_FILE}.lock"), is_singleton=True)


# The routing thresholds are the router policy's own config; one definition, stored here as-is.
Thresholds = PolicyConfig


@dataclass
class Manifest(Config):
    tokenizer: str = doc("tokenizer.json", "tokenizer file, relative to the run folder")
    router: str = doc("router", "router component folder")
    experts: dict = doc({}, "category index (as a string) -> expert component folder")
    summarizer: str | None = doc(None, "summarizer component folder, or None for an experts-only system")
    adapters: dict = doc({}, "adapter name (e.g. 'code') -> adapter folder")
    crosstalk: str | None = doc(None, "cross-talk component folder, if trained")
    pruned: dict = doc({}, "category index (as a string) -> pruning record {expert, stage, window, counts}; "
                           "a pruned category needs no expert and is routed to the remaining experts")
    thresholds: PolicyConfig = doc(None, "routing thresholds (t_C_base, k, t_CT) of the router policy")
    vocab_size: int = doc(0, "size of the shared vocabulary")
    d_model: int = doc(0, "width of the shared embedding table")
    format_version: int = doc(MANIFEST_VERSION, "manifest format version")
    meta: dict = doc({}, "free-form: corpus, training summary, timings")

    def __post_init__(self) -> None:
        if self.thresholds is None:
            self.thresholds = PolicyConfig()
        super().__post_init__()

    def validate(self) -> None:
        check(self.format_version == MANIFEST_VERSION,
              f"manifest format_version {self.format_version} is not supported (this taskmoe reads {MANIFEST_VERSION})")
        check_min(self, ("vocab_size", "d_model"), strict=True)
        both = sorted(set(self.experts) & set(self.pruned), key=int)
        check(not both, f"categories {both} are both in 'experts' and in 'pruned'")

    def save(self, run_dir: str | Path) -> Path:  # type: ignore[override]
        return atomic_write_json(Path(run_dir) / MANIFEST_FILE, self.to_dict())


def _component_dims(folder: Path) -> tuple[int | None, int | None]:
    cfg = load_component(folder).config
    # LM configs call it vocab_size/d_model; routers may nest it under "encoder"
    for c in (cfg, cfg.get("lm", {}) if isinstance(cfg.get("lm"), dict) else {}, cfg.get("encoder", {}) if isinstance(cfg.get("encoder"), dict) else {}):
        if "vocab_size" in c:
            return c.get("vocab_size"), c.get("d_model")
    return None, None


@dataclass
class ResolvedManifest:
    run_dir: Path
    manifest: Manifest
    tokenizer: Path
    router: Path
    experts: dict[int, Path] = field(default_factory=dict)
    summarizer: Path | None = None
    adapters: dict[str, Path] = field(default_factory=dict)
    crosstalk: Path | None = None

    def expert_name(self, category: int) -> str:
        """The expert's name: its folder's name as the manifest writes it (the resolved folder may
        be an interrupted save's aside copy, ``NAME.aside-*``)."""
        return Path(self.manifest.experts[str(category)]).name

    @property
    def pruned(self) -> list[int]:
        """The categories whose expert was pruned in training."""
        return sorted(int(k) for k in self.manifest.pruned)


def load_manifest(run_dir: str | Path) -> ResolvedManifest:
    """Read and validate ``run_dir/taskmoe.json`` and resolve every path it names."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no taskmoe.json (is {run_dir} a trained taskmoe run folder?)")
    raw: Any = read_json(path)
    try:
        m = Manifest.from_dict(raw, source=str(path))
    except Exception as e:  # ConfigError -> CheckpointError naming the file
        raise CheckpointError(f"{path}: {e}") from e

    def need(rel: str, what: str) -> Path:
        q = (run_dir / rel).resolve()
        if run_dir.resolve() not in q.parents and q != run_dir.resolve():
            raise CheckpointError(f"{path}: {what} path {rel!r} points outside the run folder")
        p = resolve_saved(run_dir, rel).resolve()  # read-only: an interrupted save's aside copy if need be
        if not p.exists():
            raise CheckpointError(f"{path}: {what} {rel!r} not found")
        return p

    res = ResolvedManifest(
        run_dir=run_dir,
        manifest=m,
        tokenizer=need(m.tokenizer, "tokenizer"),
        router=need(m.router, "router"),
        experts={int(k): need(v, f"expert for category {k}") for k, v in m.experts.items()},
        summarizer=need(m.summarizer, "summarizer") if m.summarizer else None,
        adapters={k: need(v, f"adapter {k}") for k, v in m.adapters.items()},
        crosstalk=need(m.crosstalk, "crosstalk") if m.crosstalk else None,
    )
    for name, folder in [("router", res.router), *[(f"expert {k}", p) for k, p in res.experts.items()],
                         *([("summarizer", res.summarizer)] if res.summarizer else [])]:
        if (folder / "adapter_config.json").is_file():  # a backbone's PEFT adapter: the loader checks its shapes
            continue
        vocab, width = _component_dims(folder)
        if vocab is not None and vocab != m.vocab_size:
            raise CheckpointError(
                f"{folder / 'config.json'}: {name} has vocab_size {vocab} but the manifest's shared vocabulary has {m.vocab_size}"
            )
        if width is not None and width != m.d_model:
            raise CheckpointError(
                f"{folder / 'config.json'}: {name} has d_model {width} but the shared embedding table is {m.d_model} wide"
            )
    return res
