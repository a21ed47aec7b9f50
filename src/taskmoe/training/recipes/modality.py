"""Recipe: add an image or audio expert to a trained DOE model (``taskmoe train modality --kind image|audio``).

Thin by design (setup / train / cleanup) over the shared loop (:func:`taskmoe.training.loop.train`):

- **setup**: the base model (a ``doe`` folder -- trained from scratch or upcycled from a
  pretrained backbone (``taskmoe doe upcycle``) --, a backbone folder itself, upcycled here with
  no text expert but ``base``, or a ``multimodal`` one to extend with another medium) and its
  tokenizer (an upcycled model's is its backbone's); the digit media (MNIST IDX files or FSDD recordings with ``--data``;
  otherwise scikit-learn's bundled 8x8 digits / synthesized tones) as :class:`MediaQA` question ->
  answer sequences over both templates (``"What digit is this? <image>" -> "7"`` and the caption
  style ``"Describe the image. <image>" -> "a handwritten seven"``); text prompts of the default
  corpus as the gate's negatives. The new modality gets an encoder and an expert (a copy of a
  text expert), and everything else is frozen.
- **train**: :class:`ModalityObjective` = answer cross-entropy with the medium's rows forced to the
  new expert, + ``gate_weight`` x BCE of the new gate (the medium's rows 1, text prompts 0).
- **cleanup**: the ``multimodal`` folder (weights, config, tokenizer.json) and a report: exact-match
  accuracy of generated answers on the held-out split per template, the share routed to the new
  expert, and the text prompts it takes (guarded routing, and its gate alone).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskmoe.config import Config, FlagPaths, check, doc
from taskmoe.data.backbone_tokenizer import TOKENIZER_CONFIG_FILE, BackboneTokenizer
from taskmoe.data.commands import get_corpus
from taskmoe.data.media_tasks import MEDIA_MARKERS, MediaQA, digit_audio, digit_images, media_placeholder
from taskmoe.data.tokenizer import TOKENIZER_FILE, Tokenizer
from taskmoe.doe.model import KIND as DOE_KIND
from taskmoe.doe.model import load_doe
from taskmoe.doe.upcycle import upcycle_config, upcycle_model
from taskmoe.models.backbones import is_backbone_dir, load_backbone, read_backbone_config
from taskmoe.doe.modality import MediaInput, MultimodalLM, build_encoder, load_multimodal, save_multimodal
from taskmoe.doe.modality.model import HEAD_INIT, model_tokenizer
from taskmoe.doe.modality.model import KIND as MM_KIND
from taskmoe.errors import ConfigError
from taskmoe.eval.modality import answer_accuracy, routing_shares
from taskmoe.io import atomic_write_json, load_component
from taskmoe.training.config import TrainConfig
from taskmoe.training.losses import IGNORE_INDEX, lm_cross_entropy
from taskmoe.training.loop import TrainResult
from taskmoe.training.loop import train as train_loop
from taskmoe.training.recipes.command import recipe_command

DEFAULT_BASE = Path("runs/default/doe/model")
DEFAULT_OUT = Path("runs/default/multimodal")


@dataclass
class ModalityTrainConfig(Config):
    kind: str = doc("image", "the medium to add: 'image' or 'audio'")
    base: str = doc(str(DEFAULT_BASE), "a DOE model folder (kind doe: trained, or upcycled from a backbone), a backbone "
                                        "folder (upcycled here), or a multimodal folder to extend")
    out: str = doc(str(DEFAULT_OUT), "where the multimodal model folder is written")
    data: str = doc("", "MNIST IDX folder (image) or FSDD recordings folder (audio); '' = bundled 8x8 digits / "
                        "synthesized tones")
    max_train: int = doc(0, "use at most this many training examples (0 = all)")
    max_test: int = doc(0, "evaluate on at most this many held-out examples (0 = all)")
    init_from: str = doc("", "text expert copied as the new expert's start ('' = the first expert); from-scratch bases")
    expert_kind: str = doc("lora", "on an upcycled backbone: 'lora' (its MLPs + a LoRA update) or 'copy' (full copies)")
    head_rank: int = doc(-1, "rank of the new expert's head adapter; -1 = 32 on a from-scratch base, 0 (none) on a "
                             "pretrained backbone, whose head already writes digits and words")
    head_init: float = doc(HEAD_INIT, "init scale of the head adapter's B (std = head_init / sqrt(head_rank)); see "
                                "taskmoe.doe.modality.model.HeadAdapter")
    channels: int = doc(0, "encoder trunk channels (0 = the encoder's default: 64 image, 96 audio)")
    negatives: int = doc(512, "text prompts of the default corpus used as the new gate's negatives")
    negative_len: int = doc(32, "tokens per text prompt (the DOE recipe's prompt_len)")
    gate_weight: float = doc(1.0, "weight of the new gate's BCE loss")
    steps: int = doc(600, "optimizer steps")
    batch_size: int = doc(64, "sequences per step")
    lr: float = doc(3e-3, "peak learning rate")
    min_lr_ratio: float = doc(0.0, "after a 5% warmup the cosine schedule ends at lr x min_lr_ratio (0: annealed "
                                   "to zero, as the CNN-alone baseline's schedule is; MNIST 1500 steps, first 2000 "
                                   "test images: 0.1 -> 97.8%, 0 -> 98.0%)")
    seed: int = doc(0, "seed of the new weights and the data order")
    progress: bool = doc(True, "show progress bars")

    def validate(self) -> None:
        check(self.kind in MEDIA_MARKERS, f"ModalityTrainConfig.kind must be one of {sorted(MEDIA_MARKERS)}, got {self.kind!r}")
        check(self.steps >= 1 and self.batch_size >= 1, "ModalityTrainConfig: steps and batch_size must be >= 1")
        check(self.max_train >= 0 and self.max_test >= 0 and self.negatives >= 1 and self.negative_len >= 1,
              "ModalityTrainConfig: max_train/max_test >= 0 and negatives/negative_len >= 1 needed")
        check(self.expert_kind in ("lora", "copy") and self.head_rank >= -1 and self.channels >= 0,
              f"ModalityTrainConfig: expert_kind 'lora'/'copy', head_rank >= -1, channels >= 0 needed, got "
              f"{self.expert_kind!r}, {self.head_rank}, {self.channels}")
        check(self.head_init > 0 and 0 <= self.min_lr_ratio <= 1, f"ModalityTrainConfig: head_init > 0 and "
              f"0 <= min_lr_ratio <= 1 needed, got {self.head_init}, {self.min_lr_ratio}")


class ModalityObjective(nn.Module):
    """``loss = CE(answer) + gate_weight * BCE(p_new; medium rows 1, text prompts 0)`` for one modality."""

    def __init__(self, model: MultimodalLM, modality: str, gate_weight: float) -> None:
        super().__init__()
        self.model, self.modality, self.gate_weight = model, modality, gate_weight
        self.column = model.base.gate.names.index(model.experts[modality])

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        media = [MediaInput.full(self.modality, batch["media"], batch["media_mask"])]
        out = self.model(batch["input_ids"], media=media, prompt_mask=batch["prompt_mask"], teacher=True)
        lm = lm_cross_entropy(out.logits, batch["targets"])
        pos = out.routing.scores[:, self.column]
        neg = self.model.route(batch["negative_ids"]).scores[:, self.column]
        p = torch.cat([pos, neg]).float().clamp(1e-6, 1 - 1e-6)
        y = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).float()
        bce = nn.functional.binary_cross_entropy(p, y)
        return lm + self.gate_weight * bce, {"lm": lm.detach(), "gate": bce.detach(),
                                             "tokens": int((batch["targets"] != IGNORE_INDEX).sum())}


def objective_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    return model(batch)


# ----------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    model: MultimodalLM
    tok: Tokenizer
    train: MediaQA
    test_media: torch.Tensor
    test_labels: Any
    text_prompts: torch.Tensor


def load_base(folder: str | Path) -> tuple[MultimodalLM, Tokenizer]:
    """The model to extend and its tokenizer: a ``doe`` folder (wrapped, no modality yet; an upcycled one
    reads its backbone's tokenizer), a backbone folder (upcycled with expert ``base`` alone), or a
    ``multimodal`` folder."""
    if is_backbone_dir(folder):
        backbone, tok = load_backbone(folder)
        base = upcycle_model(backbone, upcycle_config(folder, read_backbone_config(folder)))
        return MultimodalLM(base.eval()), tok
    comp = load_component(folder, (DOE_KIND, MM_KIND))
    model = load_multimodal(folder) if comp.kind == MM_KIND else MultimodalLM(load_doe(folder).eval())
    return model, model_tokenizer(folder, model)


def tokenizer_files(tok: Tokenizer) -> dict[str, Any]:
    """``save_component`` writers of ``tok``'s files (a backbone's tokenizer_config.json too, so it loads as one)."""
    files: dict[str, Any] = {TOKENIZER_FILE: lambda p: p.write_text(tok.to_str(), encoding="utf-8")}
    if isinstance(tok, BackboneTokenizer):
        cfg = {**tok.config, "chat_template": tok.chat_template}
        files[TOKENIZER_CONFIG_FILE] = lambda p: p.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return files


def text_prompts(tok: Tokenizer, n: int, length: int, split: str = "train") -> torch.Tensor:
    """``n`` text prompts ``(n, length)``: the prompt prefix (:meth:`Tokenizer.encode_prompt`, ``<|bos|>`` for ours)
    + the first tokens of default-corpus documents long enough."""
    docs = get_corpus(None, progress=False).splits[split]
    rows, head = [], tok.encode_prompt("")
    for ids in tok.encode_batch([d.text for d in docs], allow_special=False):
        if len(head) + len(ids) >= length:
            rows.append((head + ids)[:length])
        if len(rows) == n:
            break
    if not rows:
        raise ConfigError(f"no default-corpus document of the {split} split has {length} tokens")
    return torch.tensor(rows, dtype=torch.long)


def media_split(cfg: ModalityTrainConfig, model: MultimodalLM, split: str) -> tuple[torch.Tensor, Any]:
    if cfg.kind == "image":
        return digit_images(cfg.data or None, split)
    enc = model.encoders["audio"].cfg
    return digit_audio(cfg.data or None, split, enc.sample_rate, enc.clip_samples)


def setup(cfg: ModalityTrainConfig) -> Setup:
    model, tok = load_base(cfg.base)
    torch.manual_seed(cfg.seed)
    enc_cfg: dict[str, Any] = {"channels": cfg.channels} if cfg.channels else {}
    if cfg.kind == "image":
        x, _ = digit_images(cfg.data or None, "test")  # only the image size
        enc_cfg["image_size"] = int(x.shape[-1])
    names = model.base.gate.names
    if model.placeholder_id is None:
        model.placeholder_id = media_placeholder(tok)
    head_rank = cfg.head_rank if cfg.head_rank >= 0 else (0 if model.upcycled else 32)
    model.add_modality(cfg.kind, build_encoder(cfg.kind, enc_cfg, model.d_model), kind=cfg.expert_kind,
                       init_from=cfg.init_from or next(n for n in names if n not in model.experts.values()),
                       head_rank=head_rank, head_init=cfg.head_init)
    model.freeze_except(cfg.kind)
    x_tr, y_tr = media_split(cfg, model, "train")
    x_te, y_te = media_split(cfg, model, "test")
    if cfg.max_train:
        x_tr, y_tr = x_tr[: cfg.max_train], y_tr[: cfg.max_train]
    if cfg.max_test:
        x_te, y_te = x_te[: cfg.max_test], y_te[: cfg.max_test]
    neg = text_prompts(tok, cfg.negatives, cfg.negative_len)
    data = MediaQA(tok, cfg.kind, x_tr, y_tr, model.n_positions(cfg.kind), negatives=neg,
                   placeholder=model.placeholder_id)
    held_out = text_prompts(tok, cfg.negatives, cfg.negative_len, split="validation")
    return Setup(model, tok, data, x_te, y_te, held_out)


def train(s: Setup, cfg: ModalityTrainConfig, out_dir: Path | None = None) -> TrainResult:
    tcfg = TrainConfig(max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 20),
                       min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, progress=cfg.progress, eval_every=0, save_every=0, log_every=10, weight_decay=0.0)
    objective = ModalityObjective(s.model, cfg.kind, cfg.gate_weight)
    return train_loop(objective, objective_loss, s.train, tcfg, out_dir=out_dir, resume=False)


def cleanup(s: Setup, cfg: ModalityTrainConfig, res: TrainResult, seconds: float) -> dict[str, Any]:
    for p in s.model.parameters():
        p.requires_grad_(True)
    s.model.eval()
    acc = answer_accuracy(s.model, s.tok, cfg.kind, s.test_media, s.test_labels)
    shares = routing_shares(s.model, s.text_prompts)
    added = sum(p.numel() for p in s.model.modality_parameters(cfg.kind))
    report = {"kind": cfg.kind, "experts": list(s.model.base.gate.names), "steps": res.steps,
              "first_loss": res.losses[0] if res.losses else None,
              "final_loss": res.losses[-1] if res.losses else None, "train_seconds": round(seconds, 1),
              "train_examples": len(s.train), "test": acc, "text_routing": shares[cfg.kind], "added_params": added}
    folder = save_multimodal(s.model, cfg.out, extra_files=tokenizer_files(s.tok), meta={"report": report})
    atomic_write_json(Path(cfg.out) / "reports" / f"modality_{cfg.kind}.json", report)
    report["model"] = str(folder)
    return report


# ------------------------------------------------------------------------------------ CLI
FLAGS: dict[str, FlagPaths] = {k: k for k in ("kind", "base", "out", "data", "max_train", "max_test", "init_from",
                                              "expert_kind", "head_rank", "head_init", "channels", "steps", "batch_size",
                                              "lr", "min_lr_ratio", "seed", "progress")}
"""``train modality`` flag -> the config field it sets."""


@recipe_command(ModalityTrainConfig, FLAGS, recipe="modality")
def train_modality(*, cfg: ModalityTrainConfig) -> dict[str, Any]:
    """Add an image or audio expert (encoder + projector + expert + gate) to a trained DOE model.

    --base is a DOE model folder (taskmoe train doe, or taskmoe doe upcycle on a pretrained backbone),
    a backbone folder (taskmoe backbone import; upcycled here, expert 'base' only) or a multimodal
    folder to extend. On a backbone the new expert is --expert-kind lora (default) or copy of its
    MLPs and everything of the backbone stays frozen. --data is an
    MNIST IDX folder (image) or the FSDD recordings folder (audio); without it the bundled 8x8 digits
    or synthesized tones are used. Everything but the new encoder, projector and expert stays
    frozen, so text answers are unchanged. Reports held-out accuracy of the generated answers.
    Unset flags take ModalityTrainConfig's defaults (kind image, base runs/default/doe/model, 600 steps
    of 64 at lr 3e-3); --config reads a ModalityTrainConfig JSON, the flags given override it, and
    --set PATH=VALUE (repeatable, e.g. --set gate_weight=0.5) overrides any field last.
    """
    kind = cfg.kind
    t0 = time.time()
    s = setup(cfg)
    res = train(s, cfg)
    report = cleanup(s, cfg, res, time.time() - t0)
    for prompt, r in report["test"].items():
        print(f"{prompt!r}: accuracy {r['accuracy']:.1%} over {r['n']} held-out, taken by the {kind} expert "
              f"{r['taken_by_expert']:.1%}")
    print(f"text prompts taken by the {kind} expert: {report['text_routing']['text_taken']:.1%} "
          f"(its gate alone: {report['text_routing']['text_gate_alone']:.1%}); model: {report['model']}")
    return report
