"""``MultimodalLM``: a sequence-routed MoE LM plus modality encoders and one modality expert per medium.

Structure (VLMo's modality experts on a DOE model, LLaVA's splice)::

    ids ──embedding──┬─────────────────────────────> blocks (attention shared, MLPs = SequenceMoE) -> logits
    image ─ImageEncoder─> n vectors ─splice at the placeholder positions─┘        ^
                                                    routing (once per sequence, from the prompt)

Routing with modality keys. Every sequence either carries a medium or not, and that is known
before the model runs, so the learned gates are *guarded* by it (:func:`modality_force`, passed
as the base model's ``force``):

- a modality expert may accept only sequences that carry its medium (its column is forced to 0
  elsewhere); whether it does is still its own learned gate, ``sigmoid(w . norm(h) + b) > tau``
  (trained by BCE: its medium's sequences positive, text sequences negative);
- a sequence with a medium is refused by every text expert (columns forced to 0); if its own
  expert's gate rejects it too, the usual default (best-scoring *eligible* expert: a text
  expert, since modality experts are added late) serves it, and the report counts that;
- a text sequence keeps exactly the text model's routing: its text columns are untouched, the
  modality columns can only say no, and late experts are never the default. With everything
  else frozen, text logits are bit-identical before and after adding modality experts (tested).

Design choices:

- **Attaches to any model with the DOE expert protocol**: ``embedding`` (an ``nn.Embedding``),
  ``gate`` (a :class:`~taskmoe.doe.seq_moe.SequenceGate`), ``add_expert(name, init_from=...)``,
  ``expert_parameters(name)`` and ``forward(ids, state, *, prompt_mask, force, capacity,
  logits_to_keep)`` returning ``logits``/``state``/``routing``; :class:`DOETransformer` is one,
  and an upcycled backbone exposing the same protocol is another. The splice is a forward hook
  on ``embedding`` held only for the one call that carries media, so the base model's code and
  its text path are untouched; a call without media costs one (B, E) tensor.
- **Modality experts are ordinary experts** of the base model (one SwiGLU per MoE layer and a
  gate), named after the medium (``image``, ``audio`` by default), initialised as a copy of a
  text expert (``init_from``) so the answer's language starts from a trained MLP. Their gate
  starts *accepting* (``b = logit(tau) + 1``, ``w = 0``): the guard already confines it to its
  medium, and training then teaches ``w`` to reject text as well (reported as "gate alone").
- **Plus a head adapter of their own** (:class:`HeadAdapter`, LoRA-style on the tied output head,
  ``logits += B(A(h))``), applied only to the rows the modality expert serves. ``B`` starts random
  at full scale (``std = init / sqrt(r)``, ``init`` = 2 by default; ``delta`` then has logit-sized
  entries), not zero or small as in LoRA: there is no function to preserve on rows that never
  existed, and the gradient that reaches the hidden states (hence the encoder) is
  ``(E + B A)^T (p - y)``, which with a small ``B`` is mostly the frozen tied head ``E``'s, whose
  digit rows barely differ. Measured on MNIST at 300 steps (2000 test images, 2-core box): ``init``
  0.1 -> 67.2%, 0.5 -> 71.1%, 1 -> 83.8%, 2 -> 87.7%, 4 -> 85.2% (``summary_from='mean'``); at 0.1 a
  linear probe of the final hidden state beat the generated answer by 20 points, so the readout,
  not the features, lagged. A small text model's frozen tied head cannot make a rare token likely: in a 300-step
  base the best-aligned final hidden state gives ``"7"`` a log-probability of -7.7, so an answer
  "7" is out of reach for any MLP change alone (training plateaued at 49% on the 8x8 digits).
  Text rows never reach an adapter, so this keeps text logits bit-identical too.
- **On an upcycled backbone** (:mod:`taskmoe.doe.upcycle`, a pretrained Llama-family LM whose
  MLPs became sequence-routed experts) the modality expert is a backbone expert (``lora``: the
  frozen MLP plus its own LoRA update, or ``copy``), the encoder projects into the backbone's
  ``d_model`` and nothing of the backbone moves. The placeholder positions hold
  ``placeholder_id``, a token id plain text never encodes to (chosen by
  :func:`taskmoe.data.media_tasks.media_placeholder`: a spare special token of the backbone's
  tokenizer); the splice overwrites their embeddings, so the tied embedding is never resized.
- Saved as a component folder of kind ``"multimodal"``: the base model's config, each
  modality's expert name and encoder config, the placeholder id, and the weights in one
  ``model.safetensors`` -- all of them for a from-scratch base; for an upcycled base only its
  own tensors (gates, added experts) plus encoders and head adapters, the backbone staying in its
  folder (checked by fingerprint at load, as :func:`~taskmoe.doe.upcycle.load_upcycled` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskmoe.data.backbone_tokenizer import BackboneTokenizer, is_backbone_tokenizer_dir
from taskmoe.data.tokenizer import TOKENIZER_FILE, Tokenizer
from taskmoe.doe.model import DOEConfig, DOEOutput, build_doe
from taskmoe.doe.seq_moe import REJECT_MARGIN
from taskmoe.doe.upcycle import add_backbone_expert, backbone_base, own_tensors
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import CONFIG_FILE, check_state, load_component, save_component
from taskmoe.doe.modality.encoders import build_encoder
from taskmoe.layers.lora import train_only

KIND = "multimodal"


@dataclass
class MediaInput:
    """One modality's media in a batch: ``values`` (R, ...) for batch ``rows`` (R,) ascending, and the
    placeholder ``mask`` (B, T) bool with exactly ``n_positions`` True entries in each of those rows
    (row-major order: row ``rows[r]``'s positions take encoder output ``r``)."""

    modality: str
    values: Tensor
    mask: Tensor
    rows: Tensor

    @classmethod
    def full(cls, modality: str, values: Tensor, mask: Tensor) -> "MediaInput":
        """Every row of the batch carries this modality."""
        return cls(modality, values, mask, torch.arange(mask.shape[0], device=mask.device))


def modality_force(names: Sequence[str], experts: Mapping[str, str], batch: int, media: Sequence[MediaInput],
                   device: torch.device | str = "cpu", *, teacher: bool = False) -> Tensor:
    """The (B, E) acceptance override of the module docstring (-1 = the gate decides, 0 = reject, 1 = accept).

    ``experts`` maps modality -> expert name. With ``teacher`` a modality row is forced to its
    expert (training: the new expert learns on its own data while its gate learns by BCE).
    """
    force = torch.full((batch, len(names)), -1, dtype=torch.long, device=device)
    col = {n: j for j, n in enumerate(names)}
    mod_cols = [col[e] for e in experts.values()]
    if mod_cols:
        force[:, mod_cols] = 0
    for m in media:
        if m.modality not in experts:
            raise ConfigError(f"this model has no {m.modality!r} expert (modalities: {sorted(experts)})")
        rows = m.rows.to(device)
        force[rows] = 0  # text experts (and other modalities) refuse the row
        force[rows, col[experts[m.modality]]] = 1 if teacher else -1
    return force


@contextlib.contextmanager
def spliced(embedding: nn.Module, media: Sequence[MediaInput], vectors: Sequence[Tensor]) -> Iterator[None]:
    """While active, ``embedding``'s output (B, T, D) takes ``vectors[i]`` (R_i, n, D) at ``media[i].mask``."""

    def hook(_mod: nn.Module, _args: Any, out: Tensor) -> Tensor:
        for m, v in zip(media, vectors):
            if m.mask.shape != out.shape[:2]:
                raise ValueError(f"media mask {tuple(m.mask.shape)} does not match the input (B, T) {tuple(out.shape[:2])}")
            if int(m.mask.sum()) != v.shape[0] * v.shape[1]:
                raise ValueError(f"{m.modality}: {int(m.mask.sum())} placeholder positions for {v.shape[0]} x "
                                 f"{v.shape[1]} encoder outputs")
            out = out.masked_scatter(m.mask.unsqueeze(-1), v.to(out.dtype))
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


HEAD_INIT = 2.0
"""Default ``init`` of :class:`HeadAdapter` (``B``'s std times ``sqrt(rank)``; module docstring)."""


class HeadAdapter(nn.Module):
    """``delta(h) = B(A(h))`` (D -> r -> V; ``A`` ~ N(0, 1 / D), ``B`` ~ N(0, init^2 / r), a zero bias over
    the vocabulary)."""

    def __init__(self, d_model: int, vocab_size: int, rank: int, init: float = HEAD_INIT) -> None:
        super().__init__()
        self.rank = rank
        self.A = nn.Linear(d_model, rank, bias=False)
        self.B = nn.Linear(rank, vocab_size)
        nn.init.normal_(self.A.weight, std=d_model ** -0.5)
        nn.init.normal_(self.B.weight, std=init * rank ** -0.5)
        nn.init.zeros_(self.B.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.B(self.A(h))


class MultimodalLM(nn.Module):
    """A base DOE-protocol model, modality encoders and the modality -> expert map (see module docstring)."""

    def __init__(self, base: nn.Module, encoders: Mapping[str, nn.Module] | None = None,
                 experts: Mapping[str, str] | None = None, heads: Mapping[str, nn.Module] | None = None,
                 placeholder_id: int | None = None) -> None:
        super().__init__()
        self.base = base
        self.placeholder_id = placeholder_id  # None: the tokenizer's <|pad|> (a taskmoe tokenizer)
        self.encoders = nn.ModuleDict(dict(encoders or {}))
        self.heads = nn.ModuleDict(dict(heads or {}))
        self.experts: dict[str, str] = dict(experts or {})
        if set(self.encoders) != set(self.experts) or not set(self.heads) <= set(self.experts):
            raise ConfigError(f"MultimodalLM: encoders {sorted(self.encoders)} and head adapters {sorted(self.heads)} "
                              f"must match the expert map {sorted(self.experts)}")
        for m, name in self.experts.items():
            if name not in base.gate.names:
                raise ConfigError(f"MultimodalLM: {m} expert {name!r} is not an expert of the base model "
                                  f"({list(base.gate.names)})")

    # -- the LM interface the generation loop needs ----------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def d_model(self) -> int:
        return self.base.d_model

    def init_state(self, batch_size: int, device=None, dtype=None):
        return self.base.init_state(batch_size, device, dtype)

    @property
    def upcycled(self) -> bool:
        """True when the base is an upcycled pretrained backbone (its weights stay in the backbone folder)."""
        return getattr(self.base.doe_config, "backbone", None) is not None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.experts)

    def n_positions(self, modality: str) -> int:
        if modality not in self.encoders:
            raise ConfigError(f"this model has no {modality!r} encoder (modalities: {sorted(self.encoders)})")
        return self.encoders[modality].n_positions

    # -- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, state: Any = None, *, media: Sequence[MediaInput] = (),
                logits_to_keep: int = 0, prompt_mask: Tensor | None = None, teacher: bool = False) -> DOEOutput:
        """``input_ids`` (B, T) (+ media for a prefill) -> the base model's output; threshold routing,
        guarded by :func:`modality_force` (``teacher``: modality rows forced to their expert)."""
        media = list(media)
        force = modality_force(self.base.gate.names, self.experts, input_ids.shape[0], media, input_ids.device,
                               teacher=teacher)
        kw = dict(logits_to_keep=logits_to_keep, prompt_mask=prompt_mask, force=force, capacity=False)
        if not media:
            return self._adapt(self.base(input_ids, state, **kw), logits_to_keep)
        for m in media:
            if m.mask.shape != input_ids.shape:
                raise ValueError(f"{m.modality} mask shape {tuple(m.mask.shape)} != input_ids {tuple(input_ids.shape)}")
        vectors = [self.encoders[m.modality](m.values) for m in media]
        with spliced(self.base.embedding, media, vectors):
            out = self.base(input_ids, state, **kw)
        return self._adapt(out, logits_to_keep)

    def _adapt(self, out: DOEOutput, logits_to_keep: int) -> DOEOutput:
        """Add each modality expert's head adapter to the logits of the rows it serves (best expert)."""
        if not self.heads or out.routing is None:
            return out
        names = out.routing.names
        top = out.routing.top1()  # (B,)
        logits = out.logits
        hidden = out.hidden[:, -logits_to_keep:] if logits_to_keep else out.hidden  # (B, T', D)
        for m, head in self.heads.items():
            rows = torch.nonzero(top == names.index(self.experts[m])).squeeze(1)  # (R,)
            if rows.numel():
                delta = head(hidden.index_select(0, rows)).to(logits.dtype)  # (R, T', V)
                logits = logits.index_add(0, rows, delta)
        return out if logits is out.logits else dataclasses.replace(out, logits=logits)

    def route(self, input_ids: Tensor, media: Sequence[MediaInput] = (), prompt_mask: Tensor | None = None):
        """The guarded routing a prefill would decide (gate scores included), without running the MoE layers."""
        force = modality_force(self.base.gate.names, self.experts, input_ids.shape[0], list(media), input_ids.device)
        vectors = [self.encoders[m.modality](m.values) for m in media]
        with spliced(self.base.embedding, list(media), vectors):
            return self.base.route(input_ids, prompt_mask, force=force, capacity=False)

    # -- adding a modality ------------------------------------------------------------------
    def add_modality(self, modality: str, encoder: nn.Module, *, expert: str | None = None,
                     init_from: str | None = None, head_rank: int = 32, kind: str = "lora",
                     head_init: float = HEAD_INIT) -> str:
        """Add ``encoder``, a new expert (default name: the modality) and its head adapter (``head_rank``
        0 = none; ``B``'s init scale ``head_init``) to the base model; returns the expert's name. On a
        from-scratch base the expert is a copy of text expert ``init_from``; on an upcycled backbone it
        is a backbone expert of ``kind`` (``lora`` or ``copy`` of the backbone's MLPs)."""
        if modality in self.experts:
            raise ConfigError(f"MultimodalLM: modality {modality!r} already present (expert {self.experts[modality]!r})")
        name = expert or modality
        if self.upcycled:
            add_backbone_expert(self.base, name, kind)
        else:
            self.base.add_expert(name, init_from=init_from)
        gate = self.base.gate
        with torch.no_grad():  # start accepting (p = 0.73 at tau = 0.5): the guard already keeps it to its medium
            gate.bias[name].fill_(math.log(gate.tau / (1 - gate.tau)) + REJECT_MARGIN)
        dev = self.base.embedding.weight.device
        self.encoders[modality] = encoder.to(dev)
        if head_rank > 0:
            self.heads[modality] = HeadAdapter(self.d_model, self.vocab_size, head_rank, head_init).to(dev)
        self.experts[modality] = name
        return name

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """What training a modality moves: its encoder (trunk + projector), its expert (MLPs + gate) and head adapter."""
        head = list(self.heads[modality].parameters()) if modality in self.heads else []
        return list(self.encoders[modality].parameters()) + list(self.base.expert_parameters(self.experts[modality])) + head

    def freeze_except(self, modality: str) -> list[nn.Parameter]:
        """Freeze everything but :meth:`modality_parameters`; returns the trainable parameters."""
        return train_only(self, self.modality_parameters(modality))

    def config_dict(self) -> dict[str, Any]:
        return {"base": self.base.doe_config.to_dict(), "placeholder_id": self.placeholder_id,
                "modalities": {m: {"expert": self.experts[m], "encoder": self.encoders[m].cfg.to_dict(),
                                   "head_rank": self.heads[m].rank if m in self.heads else 0} for m in self.experts}}

    def stored_state(self) -> dict[str, Tensor]:
        """The tensors a folder stores: all of them, or on an upcycled base all but the backbone's own."""
        state = self.state_dict()
        if not self.upcycled:
            return dict(state)
        keep = {f"base.{k}" for k in own_tensors(self.base)}
        return {k: v for k, v in state.items() if not k.startswith("base.") or k in keep}


def save_multimodal(model: MultimodalLM, folder: str | Path, *, tokenizer_json: str | None = None,
                    meta: Mapping[str, Any] | None = None, extra_files: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a ``multimodal`` component folder (config.json, model.safetensors, tokenizer.json
    from ``tokenizer_json``, and any ``extra_files`` name -> writer)."""
    extra = dict(extra_files or {})
    if tokenizer_json is not None:
        extra["tokenizer.json"] = lambda p: p.write_text(tokenizer_json, encoding="utf-8")
    return save_component(folder, KIND, model.config_dict(), model.stored_state(), meta=meta, extra_files=extra)


def load_multimodal(folder: str | Path, *, device: str | torch.device = "cpu") -> MultimodalLM:
    """Rebuild a multimodal model from its folder, checking every tensor name and shape."""
    comp = load_component(folder, KIND)
    source = comp.folder / CONFIG_FILE
    mods = comp.config.get("modalities")
    if not isinstance(mods, dict) or "base" not in comp.config:
        raise CheckpointError(f"{source}: a multimodal config needs 'base' and 'modalities'")
    base_cfg = DOEConfig.from_dict(comp.config["base"], source=f"{source}.base")
    base = build_doe(base_cfg) if base_cfg.backbone is None else backbone_base(base_cfg, f"{source}.base", device=device)
    try:
        # folders written before ``summary_from`` existed used the mean summary
        encoders = {m: build_encoder(m, {"summary_from": "mean", **spec["encoder"]}, base.d_model)
                    for m, spec in mods.items()}
        experts = {m: spec["expert"] for m, spec in mods.items()}
        heads = {m: HeadAdapter(base.d_model, base.vocab_size, int(spec["head_rank"]))
                 for m, spec in mods.items() if int(spec.get("head_rank", 0)) > 0}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad 'modalities' entry ({e})") from e
    placeholder = comp.config.get("placeholder_id")
    if placeholder is not None and not (isinstance(placeholder, int) and 0 <= placeholder < base.vocab_size):
        raise CheckpointError(f"{source}: placeholder_id must be a token id in [0, {base.vocab_size}), got {placeholder!r}")
    model = MultimodalLM(base, encoders, experts, heads, placeholder_id=placeholder)
    tensors = comp.tensors()
    check_state(model.stored_state(), tensors, comp.weights)
    model.load_state_dict(tensors, strict=not model.upcycled)
    return model.to(device).eval()


def model_tokenizer(folder: str | Path, model: MultimodalLM) -> Tokenizer:
    """The tokenizer of ``model`` read from ``folder``: saved inside or beside it (a backbone's tokenizer.json +
    tokenizer_config.json, or a taskmoe one), else, for an upcycled model, its backbone folder's."""
    bb = model.base.doe_config.backbone
    if is_backbone_tokenizer_dir(folder):
        return BackboneTokenizer.load(folder)
    if bb is not None and not (Path(folder) / TOKENIZER_FILE).is_file():
        return BackboneTokenizer.load(bb.path)
    return Tokenizer.beside(folder)
