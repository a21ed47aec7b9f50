"""Recipe: the IMoE summarizer of a backbone system, a fusion LoRA adapter of the frozen backbone.

``taskmoe train summarizer --run RUN`` on a run whose experts are adapters of a backbone
(``meta.backbone``) runs this instead of the SSM recipe. Setup / train / cleanup over the one loop
(:func:`taskmoe.training.loop.train`: resume, progress bar, metrics):

1. **setup** (:func:`setup`): the run loads as an experts-only system (``taskmoe.load``); fusion
   pairs of the corpus's train and validation splits (:func:`taskmoe.eval.fusion.heldout_pairs`:
   a window's head -> its true continuation, a dialogue turn -> its reply, at most
   ``pairs_per_domain`` per domain); the routed experts draft for every prompt with the pipeline's
   own Draft stage (:meth:`System.draft`: grouped by expert, batched through ``generate_rows``, the
   prompt in the backbone's chat template), so the summarizer trains on exactly the drafts it reads
   at inference. Drafts are cached in ``RUN/drafts_backbone.jsonl`` keyed by prompt, expert,
   adapter fingerprint and draft settings (:func:`draft_sets`);
2. **train** (:func:`train`): adapter ``summarizer_fusion`` (rank ``r`` on ``targets``) learns the
   answer from :class:`~taskmoe.summarizer.backbone_format.BackboneFusionFormat` sequences (loss on
   answer tokens only, :func:`~taskmoe.training.recipes.summarizer.fusion_loss`; eos only where the
   target really ends, :func:`fusion_sequences`); the **coding
   adapter** ``summarizer_code`` starts from the fusion adapter's weights and trains on the
   code-domain sequences; the **intent head** is the SSM system's
   :class:`~taskmoe.summarizer.intent.IntentClassifier` (logistic regression, code vs other) on the
   backbone summarizer's pooled final hidden states of the prompt's user turn (fusion adapter on,
   coding adapter off: :func:`~taskmoe.inference.stages.assess.summarizer_features`, what the Assess
   stage feeds it);
3. **cleanup** (:func:`save_summarizer`, :func:`register`): ``RUN/summarizer/`` holds the fusion
   adapter (PEFT files), ``adapters/code/`` (PEFT) and ``intent/``, written as one folder atomically;
   ``taskmoe.json`` names them (``summarizer``, ``adapters.code``, ``meta.pipeline``) and
   :func:`~taskmoe.training.recipes.summarizer_run.calibrate_run` picks the disagreement threshold on
   validation as for the SSM system.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from taskmoe.config import Config, check, check_min, doc
from taskmoe.errors import ConfigError, DataError
from taskmoe.eval.fusion import heldout_pairs
from taskmoe.experts.adapter_expert import AdapterExpert, adapter_parameters
from taskmoe.io import atomic_dir, atomic_write_json
from taskmoe.models.adapters import DEFAULT_TARGETS, inject_adapter, mark_only_adapter_trainable, write_adapter_files
from taskmoe.progress import progress_bar
from taskmoe.summarizer.backbone_format import BackboneFusionFormat
from taskmoe.summarizer.backbone_summarizer import FUSION_ADAPTER, BackboneSummarizer, adapter_name
from taskmoe.summarizer.drafts import DraftCache, draft_key
from taskmoe.summarizer.examples import FusionPair
from taskmoe.summarizer.fuser import Draft, FusedSequence, order_drafts
from taskmoe.summarizer.intent import IntentClassifier, domain_intents
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import TrainResult, train as train_loop
from taskmoe.training.recipes.summarizer import ADAPTER, FusionDataset, answer_perplexity, fusion_loss

__all__ = ["BackboneSummarizerConfig", "BackboneFusionSetup", "setup", "draft_sets", "fusion_sequences", "train_adapter", "train",
           "save_summarizer", "register", "train_backbone_summarizer", "quickstart_config", "train_from_cli",
           "DRAFT_CACHE"]

DRAFT_CACHE = "drafts_backbone.jsonl"


@dataclass
class BackboneSummarizerConfig(Config):
    """Fusion data sizes, the adapters' LoRA shape and the two training runs (fusion, coding)."""

    r: int = doc(8, "LoRA rank of the fusion adapter (and of the coding adapter, which starts from it)")
    alpha: float = doc(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    targets: list = doc(list(DEFAULT_TARGETS), "projection names the adapters wrap (PEFT target_modules)")
    prompt_tokens: int = doc(48, "tokens of prompt per fusion example (a window's head, kept nearest the cut)")
    target_tokens: int = doc(32, "tokens of target (its true continuation / the reply) per example")
    draft_tokens: int = doc(32, "new tokens each selected expert drafts (the pipeline's draft_tokens)")
    max_len: int = doc(384, "fusion sequence budget in tokens (drafts are cut to fit, never the prompt)")
    pairs_per_domain: int = doc(40, "at most this many fusion pairs per domain from the train split")
    val_pairs_per_domain: int = doc(8, "at most this many per domain from the validation split")
    draft_batch_size: int = doc(16, "prompts per expert decode call while drafting")
    code_domain: str = doc("code", "corpus domain of the coding adapter and of the intent head's 'code' label")
    intent_C: float = doc(1.0, "inverse L2 strength of the intent logistic regression")
    calibrate_per_domain: int = doc(12, "validation prompts per domain for the disagreement threshold")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=60, batch_size=4, lr=1e-3, warmup_steps=6, eval_every=0, save_every=20, eval_batches=2, log_every=5),
        metadata={"help": "training of the fusion adapter"})
    adapter_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=20, batch_size=4, lr=5e-4, warmup_steps=2, eval_every=0, save_every=10, eval_batches=2, log_every=5),
        metadata={"help": "training of the coding adapter (from the fusion adapter's weights) on code fusion sequences"})

    def validate(self) -> None:
        check_min(self, ("r", "prompt_tokens", "target_tokens", "draft_tokens", "pairs_per_domain",
                         "val_pairs_per_domain", "draft_batch_size", "calibrate_per_domain"), 1)
        check(bool(self.targets), "summarizer.targets must name at least one projection")
        check(self.prompt_tokens + self.target_tokens + 48 <= self.max_len,
              f"summarizer: prompt_tokens + target_tokens + 48 (template) = {self.prompt_tokens + self.target_tokens + 48}"
              f" exceeds max_len {self.max_len}")
        check_min(self, ("intent_C",), strict=True)


@dataclass
class BackboneFusionSetup:
    """What :func:`setup` prepares: the loaded experts-only system, the format and the fusion datasets."""

    run_dir: Path
    system: Any
    fmt: BackboneFusionFormat
    train_pairs: list[FusionPair]
    val_pairs: list[FusionPair]
    train: FusionDataset
    val: FusionDataset | None
    cfg: BackboneSummarizerConfig
    backbone_dir: Path
    drafting_seconds: float = 0.0

    @property
    def base(self) -> torch.nn.Module:
        """The system's loaded backbone (the experts' adapters are in it; the summarizer's go in too)."""
        return self.system.backbone  # type: ignore[no-any-return]


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        p = Path(folder) / name
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def draft_sets(system: Any, prompts: Sequence[Sequence[int]], cache: DraftCache | None, *, draft_tokens: int,
               batch_size: int, fingerprints: dict[str, str], progress: bool = True) -> list[list[Draft]]:
    """Each prompt's drafts by its routed experts (most confident first) through ``system.draft``, cached."""
    pcfg = system.config.replace(draft_tokens=draft_tokens, draft_batch_size=batch_size)
    settings = {"max_new_tokens": draft_tokens, "repetition_penalty": pcfg.draft_repetition_penalty, "input": "chat"}
    prompts = [[int(t) for t in p] for p in prompts]
    decisions = system.router.route_batch(prompts)
    chosen: list[list[tuple[str, float]]] = []  # per prompt: (expert, confidence), first category per expert
    for d in decisions:
        seen: dict[str, float] = {}
        for ci, cat in zip(d.selected, d.selected_names):
            seen.setdefault(system.expert_of[cat], float(min(max(d.confidences[ci], 0.0), 1.0)))
        chosen.append(list(seen.items()))
    key = lambda i, e: draft_key(prompts[i], e, fingerprints.get(e, ""), settings)  # noqa: E731
    todo = [i for i, ch in enumerate(chosen) if cache is None or any(cache.get(key(i, e)) is None for e, _ in ch)]
    fresh: dict[str, list[int]] = {}
    with progress_bar(progress and bool(todo)) as bar:
        task = bar.add_task("expert drafts", total=len(todo))
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            out = system.draft([prompts[i] for i in chunk], [decisions[i] for i in chunk], cfg=pcfg)
            recs = [(key(i, d.expert), d.expert, list(d.ids)) for i, ds in zip(chunk, out) for d in ds]
            fresh.update({k: ids for k, _, ids in recs})
            if cache is not None:
                cache.put_many(recs)
            bar.advance(task, len(chunk))
    sets = []
    for i, ch in enumerate(chosen):
        ids = [(e, c, fresh.get(key(i, e)) or (cache.peek(key(i, e)) if cache is not None else None)) for e, c in ch]
        sets.append(order_drafts([Draft(e, c, tuple(x or ())) for e, c, x in ids]))
    return sets


def fusion_sequences(fmt: BackboneFusionFormat, pairs: Sequence[FusionPair], drafts: Sequence[Sequence[Draft]],
                     target_tokens: int) -> list[FusedSequence]:
    """Training sequences: prompt + drafts + target, ending with eos only where the target really ends.

    A target cut at ``target_tokens`` (a continuation or reply that goes on) keeps no final eos, so
    the summarizer never learns to stop after ``target_tokens`` tokens; a reply or a document that
    ends inside the window ends with eos (where the template closes the assistant turn).
    """
    seqs = []
    for p, d in zip(pairs, drafts):
        seq = fmt.build(p.prompt, d, p.target)
        if len(p.target) >= target_tokens:
            seq.ids.pop()  # the eos: this target is a window, not the end of the answer
        seqs.append(seq)
    return seqs


def _dataset(fmt: BackboneFusionFormat, pairs: Sequence[FusionPair], drafts: Sequence[Sequence[Draft]], pad: int,
             target_tokens: int) -> FusionDataset:
    return FusionDataset(fusion_sequences(fmt, pairs, drafts, target_tokens), pad, [p.domain for p in pairs])


def setup(run_dir: Path, corpus: Any, cfg: BackboneSummarizerConfig, *, system: Any = None, progress: bool = True,
          log: Callable[[str], None] = lambda s: None) -> BackboneFusionSetup:
    """Step 1 of the module docstring: system, fusion pairs, cached drafts, fusion datasets."""
    from taskmoe.inference.backbone_loader import backbone_dir, load_backbone_system
    from taskmoe.manifest import load_manifest

    run_dir = Path(run_dir)
    res = load_manifest(run_dir)
    if not res.manifest.meta.get("backbone"):
        raise ConfigError(f"{run_dir / 'taskmoe.json'}: not a backbone system (no meta.backbone); its summarizer is "
                          "the SSM recipe's (taskmoe.training.recipes.summarizer_run)")
    if system is None:
        system = load_backbone_system(res, summarizer=False)
    tok = system.tokenizer
    fmt = BackboneFusionFormat(tok, max_len=cfg.max_len)
    kw = dict(prompt_tokens=cfg.prompt_tokens, target_tokens=cfg.target_tokens)
    train_pairs = heldout_pairs(corpus.train, tok, per_domain=cfg.pairs_per_domain, **kw)
    try:
        val_pairs = heldout_pairs(corpus.validation, tok, per_domain=cfg.val_pairs_per_domain, **kw)
    except DataError:
        val_pairs = []
    prints = {system.expert_of[c]: _fingerprint(res.experts[i]) for i, c in enumerate(system.router.categories)
              if i in res.experts}
    cache = DraftCache(run_dir / DRAFT_CACHE)
    t0 = time.perf_counter()
    dk = dict(draft_tokens=cfg.draft_tokens, batch_size=cfg.draft_batch_size, fingerprints=prints, progress=progress)
    train_drafts = draft_sets(system, [p.prompt for p in train_pairs], cache, **dk)
    val_drafts = draft_sets(system, [p.prompt for p in val_pairs], cache, **dk) if val_pairs else []
    seconds = time.perf_counter() - t0
    log(f"fusion pairs: {len(train_pairs)} train / {len(val_pairs)} validation; drafts in {seconds:.0f} s "
        f"(cache: {cache.hits} hits, {cache.misses} misses)")
    pad = tok.pad_id
    tt = cfg.target_tokens
    return BackboneFusionSetup(run_dir, system, fmt, train_pairs, val_pairs, _dataset(fmt, train_pairs, train_drafts, pad, tt),
                               _dataset(fmt, val_pairs, val_drafts, pad, tt) if val_pairs else None, cfg,
                               backbone_dir(res), seconds)


def train_adapter(base: torch.nn.Module, name: str, data: FusionDataset, tcfg: TrainConfig, cfg: BackboneSummarizerConfig,
                  out_dir: Path, *, init_from: str | None = None, eval_data: FusionDataset | None = None,
                  callbacks: Sequence[Any] | None = None) -> TrainResult:
    """Inject adapter ``name`` (A/B copied from ``init_from`` when given) and train only it on ``data``."""
    torch.manual_seed(tcfg.seed)
    if not adapter_parameters(base, name):
        inject_adapter(base, name, r=cfg.r, alpha=cfg.alpha, targets=cfg.targets)
        if init_from is not None:
            src = adapter_parameters(base, init_from)
            with torch.no_grad():
                for k, p in adapter_parameters(base, name).items():
                    p.copy_(src[k])
    mark_only_adapter_trainable(base, name)
    model = AdapterExpert(base, name)
    try:
        return train_loop(model, fusion_loss, data, tcfg, eval_data=eval_data, out_dir=out_dir, callbacks=callbacks)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)


def train(st: BackboneFusionSetup, *, callbacks: Sequence[Any] | None = None) -> tuple[IntentClassifier, dict[str, Any]]:
    """Step 2: the fusion adapter, the coding adapter (from it), the intent head; returns the head and the report."""
    from taskmoe.inference.stages.assess import summarizer_features

    cfg, base, out = st.cfg, st.base, st.run_dir / "train" / "summarizer"
    code = adapter_name(ADAPTER)
    t0 = time.perf_counter()
    fres = train_adapter(base, FUSION_ADAPTER, st.train, cfg.train, cfg, out / "fusion", eval_data=st.val, callbacks=callbacks)
    t1 = time.perf_counter()
    code_train = st.train.subset(cfg.code_domain)
    code_val = st.val.subset(cfg.code_domain) if st.val is not None and cfg.code_domain in st.val.domains else None
    cres = train_adapter(base, code, code_train, cfg.adapter_train, cfg, out / "code", init_from=FUSION_ADAPTER,
                         eval_data=code_val, callbacks=callbacks)
    t2 = time.perf_counter()
    summ = BackboneSummarizer(base, FUSION_ADAPTER, [ADAPTER]).eval()
    pad = st.system.tokenizer.pad_id
    mapping = {cfg.code_domain: "code"}
    x = summarizer_features(summ, [st.fmt.head(p.prompt) for p in st.train_pairs], pad)
    clf = IntentClassifier(["code", "other"], x.shape[1], feature="summarizer_hidden", C=cfg.intent_C)
    clf.fit(x, domain_intents([p.domain for p in st.train_pairs], mapping))
    report: dict[str, Any] = {
        "fusion_pairs": {"train": len(st.train_pairs), "validation": len(st.val_pairs), "code_train": len(code_train)},
        "fusion_steps": fres.steps, "fusion_final_loss": fres.losses[-1] if fres.losses else None,
        "code_steps": cres.steps, "code_final_loss": cres.losses[-1] if cres.losses else None,
        "seconds": {"drafts": round(st.drafting_seconds, 1), "fusion": round(t1 - t0, 1), "code": round(t2 - t1, 1)},
    }
    if st.val is not None:
        report["val_answer_ppl"] = answer_perplexity(summ, st.val, batch_size=8)
        xe = summarizer_features(summ, [st.fmt.head(p.prompt) for p in st.val_pairs], pad)
        report["intent_val_accuracy"] = clf.accuracy(xe, domain_intents([p.domain for p in st.val_pairs], mapping))
    if code_val is not None:
        report["code_answer_ppl_fusion"] = answer_perplexity(summ, code_val, batch_size=8)
        with summ.switch_adapter(ADAPTER):
            report["code_answer_ppl_code_adapter"] = answer_perplexity(summ, code_val, batch_size=8)
    return clf, report


def save_summarizer(st: BackboneFusionSetup, intent: IntentClassifier) -> Path:
    """``RUN/summarizer/``: fusion adapter files, ``adapters/code/``, ``intent/`` (one atomic folder)."""
    ref = str(st.backbone_dir.resolve())

    def build(tmp: Path) -> None:
        write_adapter_files(st.base, FUSION_ADAPTER, tmp, base_model_name_or_path=ref)
        write_adapter_files(st.base, adapter_name(ADAPTER), tmp / "adapters" / ADAPTER, base_model_name_or_path=ref)
        intent.save(tmp / "intent")

    return atomic_dir(st.run_dir / "summarizer", build)


def register(st: BackboneFusionSetup, report: dict[str, Any]) -> None:
    """Name the summarizer, its coding adapter and the pipeline settings it was trained with in ``taskmoe.json``."""
    from taskmoe.training.recipes.summarizer_run import update_manifest

    cfg = st.cfg
    pipe = st.system.config.replace(draft_tokens=cfg.draft_tokens, max_len=cfg.max_len, adapter=ADAPTER,
                                    adapter_intent="code")
    update_manifest(st.run_dir, summarizer="summarizer", adapters={ADAPTER: f"summarizer/adapters/{ADAPTER}"},
                    meta={"pipeline": pipe.to_dict(), "summarizer": {"kind": "backbone_lora", "r": cfg.r,
                                                                     "recipe": cfg.to_dict()}})
    atomic_write_json(st.run_dir / "reports" / "summarizer.json", report)


def train_backbone_summarizer(run_dir: Path, corpus: Any, cfg: BackboneSummarizerConfig, *, calibrate: bool = True,
                              progress: bool = True, callbacks: Sequence[Any] | None = None, system: Any = None,
                              log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """setup -> train -> save, register (and calibrate the disagreement threshold); returns the report."""
    from taskmoe.training.recipes.summarizer_run import calibrate_run

    st = setup(run_dir, corpus, cfg, system=system, progress=progress, log=log)
    clf, report = train(st, callbacks=callbacks)
    save_summarizer(st, clf)
    register(st, report)
    if calibrate:
        t0 = time.perf_counter()
        cal = calibrate_run(Path(run_dir), corpus, prompt_tokens=cfg.prompt_tokens, target_tokens=cfg.target_tokens,
                            per_domain=cfg.calibrate_per_domain, seed=cfg.train.seed)
        report["seconds"]["calibrate"] = round(time.perf_counter() - t0, 1)
        report["disagreement"] = {k: cal.get(k) for k in ("threshold", "precision", "recall", "f1", "skipped") if k in cal}
        atomic_write_json(Path(run_dir) / "reports" / "summarizer.json", report)
    return report


def quickstart_config(q: Any, progress: bool) -> BackboneSummarizerConfig:
    """The summarizer sizes of a :class:`~taskmoe.training.recipes.quickstart_backbone.BackboneQuickstartConfig`."""
    tc = BackboneSummarizerConfig().train.replace(max_steps=q.summarizer_steps, warmup_steps=max(1, q.summarizer_steps // 10),
                                                  save_every=max(8, q.summarizer_steps // 2), seed=q.seed, progress=progress)
    ac = BackboneSummarizerConfig().adapter_train.replace(max_steps=q.code_adapter_steps, save_every=q.code_adapter_steps,
                                                          seed=q.seed, progress=progress)
    return BackboneSummarizerConfig(r=q.rank, alpha=2.0 * q.rank, draft_tokens=q.draft_tokens,
                                    pairs_per_domain=q.summarizer_pairs, val_pairs_per_domain=4, calibrate_per_domain=4,
                                    train=tc, adapter_train=ac)


def train_from_cli(run: Path, source: str | None, max_docs_per_domain: int | None, cfg: BackboneSummarizerConfig,
                   calibrate: bool) -> dict[str, Any]:
    """``taskmoe train summarizer --run RUN`` on a backbone run (the command built ``cfg`` from ``--config``,
    its flags and ``--set``); returns one summary row."""
    from taskmoe.data.commands import get_corpus

    progress = cfg.train.progress
    corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress)
    rep = train_backbone_summarizer(Path(run), corpus, cfg, calibrate=calibrate, progress=progress,
                                    log=print if progress else (lambda s: None))
    return {"run": str(run), "summarizer": "backbone LoRA (fusion + code adapters)",
            **{k: v for k, v in rep.items() if not isinstance(v, (dict, list))},
            **{f"disagreement_{k}": v for k, v in rep.get("disagreement", {}).items()}}
