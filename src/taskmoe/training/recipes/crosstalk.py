"""Recipe: GAN training of the cross-talk adapters of two experts (``taskmoe train crosstalk``).

Thin setup / train / cleanup over the shared loop (:func:`taskmoe.training.loop.train`) with
:class:`~taskmoe.crosstalk.gan.CrosstalkGAN` as the model and its forward as the loss:

- **setup** (:func:`setup`): load the run (manifest, tokenizer, router, the pair's experts around the shared
  embedding table); cut corpus documents into prompts of ``prompt_tokens`` tokens
  (:func:`cut_prompts`); route every prompt and keep those whose top category is one of the
  pair (:func:`pair_prompts`): the pair member the router trusts more opens, and the policy sees
  both router confidences. The pair defaults to the one the router flags for cross-talk most
  often on these prompts (else its two most frequent top categories).
- **train** (:func:`train`, i.e. :func:`train_pair`): attach a LoRA adapter to each expert, build the discriminator, measure the
  *before* rollouts (held-out prompts, fixed seeds, adapters at their zero init, i.e. the base
  experts), run the loop (metrics every step: discriminator accuracy, reward, baseline, ...;
  held-out evaluation every ``eval_every`` steps), then measure the *after* rollouts on the same
  prompts with the same seeds.
- **cleanup** (:func:`cleanup`): save ``crosstalk/`` (adapters, discriminator, config: :func:`taskmoe.crosstalk.runner.save_crosstalk`),
  the report (:func:`taskmoe.eval.crosstalk.compare_rollouts`: the final discriminator's accuracy on the before and
  after rollouts, and the perplexity of the texts under each base expert), the curves
  (:func:`plot_curves`), and register the folder in ``taskmoe.json``.

:func:`train_pair` is the same run on experts already in memory (used by the benchmark and tests).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from taskmoe.config import Config, FlagPaths, check_choice, check_min, doc
from taskmoe.crosstalk.dialogue import DialogueTokens
from taskmoe.crosstalk.discriminator import Discriminator, DiscriminatorConfig, expert_features
from taskmoe.crosstalk.gan import CrosstalkGAN, GANConfig, Rollout, attach_adapter, gan_loss
from taskmoe.crosstalk.runner import save_crosstalk
from taskmoe.errors import ConfigError, DataError
from taskmoe.eval.crosstalk import (
    collect_rollouts,
    compare_rollouts,
    detection,
    plot_curves,
    probe_accuracy,
    rollout_perplexity,
)
from taskmoe.io import atomic_write_json, read_json
from taskmoe.training.config import TrainConfig
from taskmoe.training.loop import TrainResult, train as train_loop
from taskmoe.training.metrics import METRICS_FILE
from taskmoe.training.recipes.command import recipe_command

__all__ = ["CrosstalkRecipeConfig", "CrosstalkPrompts", "cut_prompts", "pair_prompts", "collect_rollouts",
           "compare_rollouts", "detection", "rollout_perplexity", "probe_accuracy", "discriminator_setup", "plot_curves",
           "train_pair", "CrosstalkSetup", "setup", "train", "cleanup", "train_crosstalk"]


FEATURES = ("experts", "own")


@dataclass
class CrosstalkRecipeConfig(Config):
    """Prompts, the game, the discriminator, and the training run."""

    prompt_tokens: int = doc(32, "tokens per prompt (a BOS plus the start of a corpus window)")
    max_prompts: int = doc(2048, "most training prompts (evenly spaced over the corpus windows)")
    eval_prompts: int = doc(64, "held-out prompts for the evaluation and the before/after report")
    draft_tokens: int = doc(48, "dialogue length the pipeline's runner uses (stored in crosstalk/config.json)")
    draft_temperature: float = doc(0.7, "sampling temperature of the pipeline's dialogues (stored in crosstalk/config.json)")
    gan: GANConfig = doc(GANConfig(), "the adversarial game (rollouts, reward, baseline, LoRA)")
    discriminator: DiscriminatorConfig = doc(DiscriminatorConfig(), "the discriminator (vocab_size and feature_dim "
                                                                    "are set from the experts)")
    features: str = doc("experts", "discriminator token features: 'experts' (their frozen embedding table) or 'own' "
                                   "(an embedding learned from scratch)")
    train: TrainConfig = doc(TrainConfig(max_steps=200, batch_size=8, lr=1e-3, weight_decay=0.0, warmup_steps=10,
                                         eval_every=50, eval_batches=4, save_every=50, log_every=1),
                             "the GAN run (one step = one batch of prompts, both rollouts, both updates)")

    def validate(self) -> None:
        check_min(self, ("max_prompts", "eval_prompts", "draft_tokens"), 1)
        check_min(self, ("prompt_tokens",), 2)
        check_min(self, ("draft_temperature",))
        check_choice(self, "features", FEATURES)
        for name, t in (("gan", GANConfig), ("discriminator", DiscriminatorConfig), ("train", TrainConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, t.from_dict(getattr(self, name), source=f"CrosstalkRecipeConfig.{name}"))


# -------------------------------------------------------------------------------------- data
class CrosstalkPrompts(torch.utils.data.Dataset):
    """Equal-length prompts with their opener (0 or 1) and the pair's confidences ``(C_0, C_1)``."""

    def __init__(self, prompts: Sequence[Sequence[int]], first: Sequence[int], confidences: Sequence[Sequence[float]]) -> None:
        if not prompts:
            raise DataError("CrosstalkPrompts: no prompts (the corpus gave no window routed to the pair)")
        if not len(prompts) == len(first) == len(confidences):
            raise DataError(f"CrosstalkPrompts: {len(prompts)} prompts, {len(first)} openers, {len(confidences)} confidences")
        lengths = {len(p) for p in prompts}
        if len(lengths) != 1:
            raise DataError(f"CrosstalkPrompts: prompts must have one length (rollouts are batched), got {sorted(lengths)}")
        self.prompt = torch.tensor([list(p) for p in prompts], dtype=torch.long)  # (N, P)
        self.first = torch.tensor(list(first), dtype=torch.long)  # (N,)
        self.confidences = torch.tensor([list(c) for c in confidences], dtype=torch.float32)  # (N, 2)

    def __len__(self) -> int:
        return self.prompt.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"prompt": self.prompt[i], "first": self.first[i], "confidences": self.confidences[i]}

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive batches in order (for before/after evaluation)."""
        return [{"prompt": self.prompt[i : i + batch_size], "first": self.first[i : i + batch_size],
                 "confidences": self.confidences[i : i + batch_size]} for i in range(0, len(self), batch_size)]


def cut_prompts(docs_ids: Sequence[Sequence[int]], bos_id: int, prompt_tokens: int, limit: int) -> tuple[list[list[int]], list[int]]:
    """Non-overlapping windows ``[bos, ids[s : s + P - 1]]`` of every document, at most ``limit``
    of them evenly spaced; returns the prompts and each one's document index."""
    n = prompt_tokens - 1
    all_rows = [([int(bos_id), *map(int, ids[s : s + n])], d) for d, ids in enumerate(docs_ids)
                for s in range(0, len(ids) - n + 1, n)]
    if len(all_rows) > limit:
        step = len(all_rows) / limit
        all_rows = [all_rows[int(i * step)] for i in range(limit)]
    return [r for r, _ in all_rows], [d for _, d in all_rows]


def pair_prompts(prompts: Sequence[Sequence[int]], confidences: Any, pair: tuple[int, int]) -> CrosstalkPrompts:
    """Keep the prompts whose top category (``confidences`` (N, K) from the router) is in ``pair``;
    the opener is the pair member with the higher confidence."""
    import numpy as np

    c = np.asarray(confidences, dtype=np.float64)
    a, b = pair
    keep = [i for i in range(len(prompts)) if int(c[i].argmax()) in pair]
    return CrosstalkPrompts([prompts[i] for i in keep], [0 if c[i, a] >= c[i, b] else 1 for i in keep],
                            [(float(c[i, a]), float(c[i, b])) for i in keep])


# -------------------------------------------------------------------------------------- train
@dataclass
class PairResult:
    gan: CrosstalkGAN
    result: TrainResult
    before: list[Rollout]
    after: list[Rollout]
    report: dict[str, Any]


def train_pair(experts: Sequence[nn.Module], names: Sequence[str], data: CrosstalkPrompts, eval_data: CrosstalkPrompts,
               cfg: CrosstalkRecipeConfig, out_dir: Path | None, *, tokens: DialogueTokens = DialogueTokens(),
               resume: bool = True, accelerator: Any = None) -> PairResult:
    """Attach adapters, build the discriminator, measure before, train with the loop, measure after."""
    g = cfg.gan
    torch.manual_seed(cfg.train.seed)  # adapter A matrices and the discriminator: the same init on every run
    for m in experts:
        attach_adapter(m, g)
    disc = Discriminator(*discriminator_setup(experts, cfg))
    gan = CrosstalkGAN(list(experts), list(names), disc, g, tokens)
    bs = cfg.train.batch_size
    before = collect_rollouts(gan, eval_data, bs, seed=g.seed + 10_000)
    res = train_loop(gan, gan_loss, data, cfg.train, eval_data=eval_data, out_dir=out_dir, resume=resume, accelerator=accelerator)
    after = collect_rollouts(gan, eval_data, bs, seed=g.seed + 10_000)
    report = compare_rollouts(gan, before, after)
    report["steps"] = res.steps
    return PairResult(gan, res, before, after, report)


def discriminator_setup(experts: Sequence[nn.Module], cfg: CrosstalkRecipeConfig) -> tuple[DiscriminatorConfig, torch.Tensor | None]:
    """The discriminator's config and token features for these experts (``cfg.features``)."""
    dcfg = cfg.discriminator.replace(vocab_size=int(experts[0].vocab_size), feature_dim=0)
    if cfg.features == "own":
        return dcfg, None
    table = expert_features(experts)
    return dcfg.replace(feature_dim=int(table.shape[1])), table


def _default_pair(decisions: Sequence[Any], k: int) -> tuple[int, int]:
    pairs = Counter(tuple(sorted(d.crosstalk)) for d in decisions if d.crosstalk is not None)
    if pairs:
        return pairs.most_common(1)[0][0]
    tops = [c for c, _ in Counter(d.top for d in decisions).most_common(2)]
    if len(tops) < 2:
        tops = [c for c in range(k) if c not in tops][: 2 - len(tops)] + tops
    return int(tops[0]), int(tops[1])


@dataclass
class CrosstalkSetup:
    """What :func:`setup` prepares: the run's pieces, the pair, and its prompts."""

    run: Path
    cfg: CrosstalkRecipeConfig
    names: list[str]
    experts: list[nn.Module]
    data: CrosstalkPrompts
    eval_data: CrosstalkPrompts
    tokens: DialogueTokens


def setup(run: Path, cfg: CrosstalkRecipeConfig, *, first: str | None = None, second: str | None = None,
          source: str | None = None, max_docs_per_domain: int | None = None, progress: bool = True,
          log: Callable[[str], None] = lambda s: None) -> CrosstalkSetup:
    """Load the run, cut and route the prompts, choose the pair, load its experts (module docstring)."""
    from taskmoe.data.commands import get_corpus
    from taskmoe.data.tokenizer import Tokenizer
    from taskmoe.experts.expert_lm import load_expert
    from taskmoe.manifest import MANIFEST_FILE, load_manifest
    from taskmoe.router.persist import load_shared_embedding
    from taskmoe.router.router import Router

    run = Path(run)
    res = load_manifest(run)
    tok = Tokenizer.load(res.tokenizer)
    router = Router.load(res.router, tokenizer=tok)
    shared = router.embedding if router.embedding is not None else load_shared_embedding(res.router)
    shared.requires_grad_(False)
    folders = {i: p for i, p in res.experts.items()}
    name_of = {i: res.expert_name(i) for i in folders}
    index_of = {n: i for i, n in name_of.items()}
    for n in (first, second):
        if n is not None and n not in index_of:
            raise ConfigError(f"unknown expert {n!r}; {run / MANIFEST_FILE} has experts {sorted(index_of)}")
    corpus = get_corpus(source, max_docs_per_domain=max_docs_per_domain, progress=progress)
    splits = {}
    for split, limit in (("train", cfg.max_prompts), ("validation", cfg.eval_prompts)):
        docs = corpus.splits.get(split) or []
        ids = tok.encode_batch([d.text for d in docs], allow_special=False)
        prompts, _ = cut_prompts(ids, tok.bos_id, cfg.prompt_tokens, limit * 4)  # extra: some go to other experts
        splits[split] = (prompts, router.route_batch([p[1:] for p in prompts]) if prompts else [])
    if not splits["train"][0]:
        raise DataError(f"no training prompts of {cfg.prompt_tokens} tokens in the corpus")
    if first is not None and second is not None:
        pair = (index_of[first], index_of[second])
    else:
        pair = _default_pair(splits["train"][1], router.n_categories)
        if first is not None:
            pair = (index_of[first], pair[1] if pair[1] != index_of[first] else pair[0])
        elif second is not None:
            pair = (pair[0] if pair[0] != index_of[second] else pair[1], index_of[second])
    if pair[0] == pair[1]:
        raise ConfigError(f"cross-talk needs two different experts, got {name_of[pair[0]]!r} twice")
    missing = [i for i in pair if i not in folders]
    if missing:
        raise ConfigError(f"categories {missing} have no expert in {run / MANIFEST_FILE}")
    names = [name_of[pair[0]], name_of[pair[1]]]

    def subset(split: str, limit: int) -> CrosstalkPrompts:
        prompts, decisions = splits[split]
        ds = pair_prompts(prompts, [d.confidences for d in decisions], pair)
        keep = torch.linspace(0, len(ds) - 1, steps=min(limit, len(ds))).round().long().unique()
        return CrosstalkPrompts(ds.prompt[keep].tolist(), ds.first[keep].tolist(), ds.confidences[keep].tolist())

    data = subset("train", cfg.max_prompts)
    eval_data = subset("validation", cfg.eval_prompts) if splits["validation"][0] else subset("train", cfg.eval_prompts)
    log(f"cross-talk pair {names[0]} <-> {names[1]}: {len(data)} training prompts, {len(eval_data)} held-out")
    experts = [load_expert(folders[i], shared) for i in pair]
    return CrosstalkSetup(run, cfg, names, experts, data, eval_data, DialogueTokens.from_tokenizer(tok))


def train(st: CrosstalkSetup, *, resume: bool = True, accelerator: Any = None) -> PairResult:
    """The recipe's train step: :func:`train_pair` on the setup's experts and prompts."""
    return train_pair(st.experts, st.names, st.data, st.eval_data, st.cfg, st.run / "crosstalk" / "train",
                      tokens=st.tokens, resume=resume, accelerator=accelerator)


def cleanup(st: CrosstalkSetup, pr: PairResult) -> dict[str, Any]:
    """Save ``crosstalk/``, its report and curves, register it in the manifest; return the summary row."""
    from taskmoe.manifest import MANIFEST_FILE, Manifest

    cfg, names, out = st.cfg, st.names, st.run / "crosstalk"
    report = {"pair": names, "prompts": {"train": len(st.data), "held_out": len(st.eval_data)}, **pr.report}
    dialogue = cfg.gan.dialogue.replace(max_new_tokens=cfg.draft_tokens, temperature=cfg.draft_temperature)
    save_crosstalk(out, pr.gan.experts, names, pr.gan.discriminator, adapter=cfg.gan.adapter, dialogue=dialogue,
                   gan=cfg.gan.to_dict(), meta={"report": report, "recipe": cfg.to_dict()})
    atomic_write_json(out / "report.json", report)
    png = plot_curves(out / "train" / METRICS_FILE, out / "curves.png", title=f"cross-talk GAN: {names[0]} <-> {names[1]}")
    path = st.run / MANIFEST_FILE
    Manifest.from_dict(read_json(path), source=str(path)).replace(crosstalk="crosstalk").save(st.run)
    d = report["discriminator"]
    return {"pair": " <-> ".join(names), "steps": pr.result.steps,
            "d_acc_before": round(d["before"]["d_acc"], 4), "d_acc_after": round(d["after"]["d_acc"], 4),
            **{f"ppl_{n}_interrupted": f"{p['interrupted_before']:.1f} -> {p['interrupted_after']:.1f}"
               for n, p in report["perplexity"].items()},
            "folder": str(out), "plot": str(png)}


FLAGS: dict[str, FlagPaths] = {"steps": "train.max_steps", "batch_size": "train.batch_size", "lr": "train.lr",
                               "seed": "train.seed", "progress": "train.progress", "reward": "gan.reward",
                               "prompt_tokens": "prompt_tokens"}
"""``train crosstalk`` flag -> the config path it sets."""


@recipe_command(CrosstalkRecipeConfig, FLAGS, recipe="train crosstalk")
def train_crosstalk(run: Path = Path("runs/default"), first: Optional[str] = None, second: Optional[str] = None,
                    source: Optional[str] = None, max_docs_per_domain: Optional[int] = None, progress: bool = True, *,
                    cfg: CrosstalkRecipeConfig) -> dict[str, Any]:
    """Train the cross-talk adapters of two experts of a run folder against a discriminator (GAN).

    --first/--second name the pair (expert folder names; default: the pair the router flags for
    cross-talk most often on the corpus prompts). Prompts are corpus windows (the default corpus,
    or --source) whose top category is one of the pair; the expert the router trusts more opens,
    the other interrupts. Both experts get a LoRA adapter (base weights frozen) trained with
    REINFORCE on the discriminator's verdict (--reward soft|hard); the discriminator learns with
    cross-entropy. Writes RUN/crosstalk/ (adapters, discriminator, config, report.json, curves.png,
    train/metrics.jsonl with discriminator accuracy and generator reward per step) and registers
    it in RUN/taskmoe.json. --config reads a CrosstalkRecipeConfig JSON; flags given override it,
    and --set PATH=VALUE (repeatable, e.g. --set gan.adapter.rank=4) overrides any field last.
    """
    st = setup(Path(run), cfg, first=first, second=second, source=source, max_docs_per_domain=max_docs_per_domain,
               progress=progress, log=print if progress else (lambda s: None))
    return cleanup(st, train(st))
