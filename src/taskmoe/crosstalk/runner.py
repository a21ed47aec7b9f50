"""The cross-talk folder of a run, and the runner the IMoE pipeline calls when the router flags a pair.

On disk (``runs/<name>/crosstalk/``, written by ``taskmoe train crosstalk``)::

    config.json          kind "crosstalk": {"experts": [a, b], "adapter", "dialogue", "gan"}, meta: the report
    adapters/<expert>/   that expert's cross-talk LoRA adapter (lora_adapter component)
    discriminator/       the discriminator (crosstalk_discriminator component)
    train/               the GAN run's checkpoints and metrics.jsonl (the shared train loop's folder)
    report.json, curves.png

``config.json`` is written last, so a folder with it is complete. :func:`load_crosstalk`
validates it and every folder it names.

:class:`CrosstalkRunner` implements the pipeline's batched cross-talk protocol
(:meth:`CrosstalkRunner.run_batch`, see :mod:`taskmoe.inference.stages.crosstalk`): it runs every
flagged row of one expert pair in ONE :func:`~taskmoe.crosstalk.dialogue.run_dialogues` call, the
more confident expert of each row opening, each row drawing from its own generator seeded with
``seed`` (so a row's transcript is the one it gets alone) and ``emit`` streaming the tokens and
stopping cancelled rows; ``runner(prompt_ids, speakers, drafts)`` is the one-prompt form. It hands the summarizer one draft per speaker
(:meth:`~taskmoe.crosstalk.dialogue.Transcript.drafts`; an expert that never got the floor keeps
its independent draft) and the trace one dict per turn (expert, text, tokens, interrupted,
p_interrupt, declined probabilities). Adapters are loaded lazily into the experts the store hands
over (once per loaded model: an evicted and reloaded expert gets it again) and switched off right
away, so the expert's ordinary drafts stay those of the base model; the dialogue switches them
on only during cross-talk. An expert without a trained adapter talks with its base weights.
An untrained runner (``CrosstalkRunner(tokenizer)``, no adapters) lets the experts talk with their
base weights: what a run without a ``crosstalk/`` folder uses (see :func:`taskmoe.load`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from taskmoe.crosstalk.dialogue import DialogueConfig, DialogueEmit, DialogueTokens, Speaker, run_dialogues
from taskmoe.crosstalk.discriminator import Discriminator, load_discriminator, save_discriminator
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import CONFIG_FILE, FORMAT_VERSION, atomic_write_json, load_component
from taskmoe.layers.lora import adapter_names, load_adapter, save_adapter, set_adapter
from taskmoe.summarizer.fuser import Draft

__all__ = ["KIND", "CrosstalkFolder", "save_crosstalk", "load_crosstalk", "CrosstalkRunner"]

KIND = "crosstalk"
ADAPTERS_DIR = "adapters"
DISCRIMINATOR_DIR = "discriminator"


@dataclass
class CrosstalkFolder:
    """A validated ``crosstalk/`` folder."""

    folder: Path
    experts: list[str]
    adapter: str
    dialogue: DialogueConfig
    adapters: dict[str, Path]
    config: dict[str, Any]
    meta: dict[str, Any]

    def discriminator(self) -> Discriminator:
        return load_discriminator(self.folder / DISCRIMINATOR_DIR)


def save_crosstalk(folder: str | Path, experts: Sequence[nn.Module], names: Sequence[str], discriminator: Discriminator,
                   *, adapter: str, dialogue: DialogueConfig, gan: Mapping[str, Any] | None = None,
                   meta: Mapping[str, Any] | None = None) -> Path:
    """Write the adapters of both experts and the discriminator, then ``config.json``."""
    folder = Path(folder)
    if len(experts) != len(names):
        raise ConfigError(f"{len(experts)} experts but {len(names)} names")
    for name, model in zip(names, experts):
        save_adapter(model, folder / ADAPTERS_DIR / name, adapter, meta={"expert": name})
    save_discriminator(discriminator, folder / DISCRIMINATOR_DIR)
    config = {"experts": list(names), "adapter": adapter, "dialogue": dialogue.to_dict(), "gan": dict(gan or {})}
    atomic_write_json(folder / CONFIG_FILE, {"format_version": FORMAT_VERSION, "kind": KIND, "config": config,
                                             "meta": dict(meta or {})})
    return folder


def load_crosstalk(folder: str | Path) -> CrosstalkFolder:
    """Read and validate a ``crosstalk/`` folder (CheckpointError naming the file on any problem)."""
    comp = load_component(folder, KIND)
    cfg_path = comp.folder / CONFIG_FILE
    c = comp.config
    experts, adapter = c.get("experts"), c.get("adapter")
    if not isinstance(experts, list) or len(experts) != 2 or not all(isinstance(e, str) for e in experts):
        raise CheckpointError(f"{cfg_path}: 'experts' must name the two experts of the pair, got {experts!r}")
    if not isinstance(adapter, str) or not adapter:
        raise CheckpointError(f"{cfg_path}: 'adapter' must be the adapter name, got {adapter!r}")
    try:
        dialogue = DialogueConfig.from_dict(c.get("dialogue", {}), source=f"{cfg_path}: dialogue")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    adapters = {}
    for e in experts:
        p = comp.folder / ADAPTERS_DIR / e
        if not (p / CONFIG_FILE).is_file():
            raise CheckpointError(f"{cfg_path}: names expert '{e}', but its adapter folder {p} is missing")
        adapters[e] = p
    if not (comp.folder / DISCRIMINATOR_DIR / CONFIG_FILE).is_file():
        raise CheckpointError(f"{cfg_path}: the discriminator folder {comp.folder / DISCRIMINATOR_DIR} is missing")
    return CrosstalkFolder(comp.folder, list(experts), adapter, dialogue, adapters, dict(c), dict(comp.meta))


class CrosstalkRunner:
    """The pipeline's cross-talk hook (module docstring).

    Args:
        tokenizer: the run's tokenizer (BOS, EOS, sentence ends, decoding the trace).
        cfg: how the dialogue runs (default :class:`DialogueConfig`).
        adapters: expert name -> adapter folder (loaded into that expert on first use).
        adapter: the adapter's name inside the experts.
        seed: seed of each call's generator (None: nondeterministic).
    """

    def __init__(self, tokenizer: Any, cfg: DialogueConfig | None = None, *, adapters: Mapping[str, str | Path] | None = None,
                 adapter: str = "crosstalk", seed: int | None = 0) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg or DialogueConfig()
        self.adapters = {k: Path(v) for k, v in (adapters or {}).items()}
        self.adapter = adapter
        self.seed = seed
        self.tokens = DialogueTokens.from_tokenizer(tokenizer)

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer: Any, *, cfg: DialogueConfig | None = None,
                    seed: int | None = 0) -> "CrosstalkRunner":
        """A runner with the adapters and dialogue settings of a trained ``crosstalk/`` folder."""
        ct = load_crosstalk(folder)
        return cls(tokenizer, cfg or ct.dialogue, adapters=ct.adapters, adapter=ct.adapter, seed=seed)

    def speaker(self, name: str, model: nn.Module) -> Speaker:
        """The expert as a dialogue speaker, its adapter loaded (and switched off) if it has one."""
        folder = self.adapters.get(name)
        if folder is None:
            return Speaker(name, model, None)
        if self.adapter not in adapter_names(model):
            load_adapter(model, folder, name=self.adapter)
            set_adapter(model, None)  # ordinary drafts stay base; the dialogue switches it on in cross-talk
        return Speaker(name, model, self.adapter)

    @property
    def trained(self) -> bool:
        """True when the experts talk with trained cross-talk adapters (False: base weights)."""
        return bool(self.adapters)

    def run_batch(self, prompts: Sequence[Sequence[int]], speakers: Sequence[tuple[str, nn.Module]],
                  confidences: Sequence[tuple[float, float]], drafts: Sequence[Sequence[Draft]],
                  emit: DialogueEmit | None = None) -> list[tuple[list[Draft], list[dict[str, Any]]]]:
        """One dialogue per row between the same two experts, decoded together.

        ``prompts``: prompt ids per row (no BOS); ``speakers``: ``[(name, model)] * 2``;
        ``confidences``: per row, the router confidences of the two speakers (the more confident
        opens; a tie: speaker 0); ``drafts``: per row, the independent drafts (kept for a speaker
        that never gets the floor); ``emit(row, token, speaker) -> bool`` streams each token and
        halts a row on False. Returns per row the drafts for the summarizer and the trace's turns.
        """
        if len(speakers) != 2:
            raise ConfigError(f"cross-talk runs between two experts, got {len(speakers)}")
        (na, ma), (nb, mb) = speakers
        first = [0 if float(ca) >= float(cb) else 1 for ca, cb in confidences]
        gens = [torch.Generator().manual_seed(self.seed) if self.seed is not None else None for _ in prompts]
        bos = int(self.tokenizer.bos_id)
        transcripts = run_dialogues([self.speaker(na, ma), self.speaker(nb, mb)], [[bos, *map(int, p)] for p in prompts],
                                    [(float(a), float(b)) for a, b in confidences], self.cfg, gens, first=first,
                                    tokens=self.tokens, emit=emit)

        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special=True)

        return [(t.drafts(fallback=list(d)), t.trace(decode)) for t, d in zip(transcripts, drafts)]

    def __call__(self, prompt_ids: list[int], speakers: list[tuple[str, float, nn.Module]],
                 drafts: list[Draft]) -> tuple[list[Draft], list[dict[str, Any]]]:
        """One prompt: ``speakers`` = ``[(name, confidence, model)] * 2``; see :meth:`run_batch`."""
        if len(speakers) != 2:
            raise ConfigError(f"cross-talk runs between two experts, got {len(speakers)}")
        (na, ca, ma), (nb, cb, mb) = speakers
        return self.run_batch([prompt_ids], [(na, ma), (nb, mb)], [(ca, cb)], [drafts])[0]
