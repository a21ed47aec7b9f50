"""``DOETransformer``: a transformer whose MLPs are sequence-routed experts, and its config and builder.

Structure (built on :func:`taskmoe.models.transformer_lm`, whose ``mlp_factory`` injects the MLPs)::

    embedding -> [Block(Attention, SwiGLU | SequenceMoE)] x n_layers -> RMSNorm -> tied head
                                 ^ routing, decided once per sequence by the model's SequenceGate

Design choices:

- **One routing per sequence, for every layer and every generated token.** Layer ``i`` is a
  ``SequenceMoE`` when ``i % moe_every == moe_every - 1``. The gate scores the residual stream
  entering the first MoE layer, mean-pooled over the *prompt* tokens (``prompt_mask``; by default
  the whole input of the first call), so with ``moe_every = 1`` routing reads the embeddings and
  with ``moe_every = k`` the first ``k - 1`` dense blocks contextualise first. The decision is a
  :class:`~taskmoe.doe.routing.Routing` that every MoE layer receives; while decoding it is the
  MoE layers' state (``BlockState.mlp``), so it is selected, concatenated and cloned with the KV
  cache and never recomputed: generated tokens cannot change it.
- **Gates are per expert and shared by all MoE layers** (the seed: "each expert would be
  associated with a set of gating weights"). Adding an expert adds one SwiGLU per MoE layer plus
  one gate; :meth:`DOETransformer.freeze_except` leaves only those trainable, and a new gate starts
  rejecting everything and never serves as the default, so sequences it rejects keep bit-identical
  outputs (tested).
- **Extraction** (:meth:`DOETransformer.extract`) copies the model without the other experts; a
  sequence whose routed experts are all kept gets identical outputs (Task-MoE's sub-network).
- Saved as a :mod:`taskmoe.io` component folder (kind ``"doe"``): ``config.json`` holds the
  :class:`DOEConfig` (current expert names and which ones were added late), weights in
  ``model.safetensors``.
- **On a pretrained backbone** (:mod:`taskmoe.doe.upcycle`): ``lm`` is then a
  :class:`~taskmoe.models.backbones.LlamaConfig`, ``backbone`` (a :class:`BackboneSpec`) names the
  backbone folder and each added expert's kind, blocks before ``gate_layer`` stay dense, and the
  folder stores only the gates and the added experts (the base weights stay in the backbone folder).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from taskmoe.config import Config, check, doc
from taskmoe.doe.routing import Routing, gate_loss, pool_prompt
from taskmoe.doe.seq_moe import SequenceGate, SequenceMoE, check_name
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import CONFIG_FILE, check_state, load_component, save_component
from taskmoe.layers import LMState, SwiGLU
from taskmoe.models import CausalLM, LMOutput, TransformerLMConfig, init_lm_weights, transformer_lm
from taskmoe.models.backbones import LlamaConfig
from taskmoe.layers.block import BlockState
from taskmoe.layers.lora import train_only

KIND = "doe"
GATE_SUPERVISION = ("none", "router")
EXPERT_KINDS = ("copy", "lora")


@dataclass
class BackboneSpec(Config):
    """Where an upcycled DOE model's base weights live, and what each added expert is."""

    path: str = doc("", "the backbone folder (Hugging Face layout) whose weights are the frozen base")
    kinds: dict[str, str] = doc({}, "added expert -> 'copy' (a full copy of each MLP) or 'lora' (the MLP + a LoRA update)")
    lora_rank: int = doc(8, "LoRA rank r of a new 'lora' expert")
    lora_alpha: float = doc(16.0, "LoRA alpha of a new 'lora' expert (scale alpha / r)")
    fingerprint: str = doc("", "hash of the backbone's weight files at upcycling (a changed backbone is refused)")

    def validate(self) -> None:
        check(bool(self.path), "BackboneSpec.path must name the backbone folder")
        bad = {k: v for k, v in self.kinds.items() if v not in EXPERT_KINDS}
        check(not bad, f"BackboneSpec.kinds: kinds must be one of {EXPERT_KINDS}, got {bad}")
        check(self.lora_rank >= 1 and self.lora_alpha > 0,
              f"BackboneSpec: lora_rank >= 1 and lora_alpha > 0 needed, got {self.lora_rank}, {self.lora_alpha}")


@dataclass
class DOEConfig(Config):
    lm: TransformerLMConfig | LlamaConfig = doc(TransformerLMConfig(), "the transformer (width, depth, heads, vocab): "
                                                "ours, or a pretrained backbone's LlamaConfig")
    experts: list[str] = doc(["e0", "e1", "e2", "e3"], "expert names (one SwiGLU per MoE layer and one gate each)")
    late_experts: list[str] = doc([], "experts added after training: they serve only what their gate accepts")
    moe_every: int = doc(1, "layer i is a SequenceMoE when i % moe_every == moe_every - 1 (1 = every layer)")
    expert_hidden: int = doc(0, "SwiGLU hidden width of each expert; 0 = lm.mlp_dim (a dense layer's width)")
    tau: float = doc(0.5, "gate threshold: expert e accepts a sequence when sigmoid(w_e . h + b_e) > tau")
    max_experts: int = doc(1, "experts serving one sequence at most (1 = active parameters of a dense model)")
    capacity_factor: float = doc(1.0, "training: each expert takes at most ceil(capacity_factor * max_experts * B / E) "
                                      "sequences of a batch")
    gate_supervision: str = doc("none", "'none': gates learn from the LM loss + capacity targets; "
                                        "'router': BCE against given category labels")
    gate_loss_weight: float = doc(0.1, "weight of the gate BCE loss added to the LM loss")
    gate_layer: int = doc(0, "blocks before it stay dense MLPs; the gates read the residual stream entering it "
                             "(pooled over the prompt)")
    backbone: Optional[BackboneSpec] = doc(None, "set for a model upcycled from a pretrained backbone (doe.upcycle)")

    def __post_init__(self) -> None:
        if isinstance(self.lm, dict):  # from JSON: a backbone's config has hidden_size, ours d_model
            cls = LlamaConfig if "hidden_size" in self.lm else TransformerLMConfig
            self.lm = cls.from_dict(self.lm, source="DOEConfig.lm")
        if isinstance(self.backbone, dict):
            self.backbone = BackboneSpec.from_dict(self.backbone, source="DOEConfig.backbone")
        super().__post_init__()

    @property
    def n_layers(self) -> int:
        return self.lm.num_hidden_layers if isinstance(self.lm, LlamaConfig) else self.lm.n_layers

    @property
    def d_model(self) -> int:
        return self.lm.hidden_size if isinstance(self.lm, LlamaConfig) else self.lm.d_model

    def validate(self) -> None:
        check(isinstance(self.experts, list) and len(self.experts) >= 1, "DOEConfig.experts must list at least one name")
        for n in self.experts:
            check_name(n)
        check(len(set(self.experts)) == len(self.experts), f"DOEConfig.experts has duplicates: {self.experts}")
        check(set(self.late_experts) <= set(self.experts),
              f"DOEConfig.late_experts {self.late_experts} must be a subset of experts {self.experts}")
        check(isinstance(self.moe_every, int) and 1 <= self.moe_every <= self.n_layers,
              f"DOEConfig.moe_every must be in [1, lm.n_layers={self.n_layers}], got {self.moe_every!r}")
        check(isinstance(self.gate_layer, int) and 0 <= self.gate_layer < self.n_layers,
              f"DOEConfig.gate_layer must be in [0, {self.n_layers - 1}], got {self.gate_layer!r}")
        check(self.backbone is None or set(self.backbone.kinds) <= set(self.experts),
              f"DOEConfig.backbone.kinds names experts not in {self.experts}")
        check(isinstance(self.expert_hidden, int) and self.expert_hidden >= 0,
              f"DOEConfig.expert_hidden must be an integer >= 0, got {self.expert_hidden!r}")
        check(0.0 < self.tau < 1.0, f"DOEConfig.tau must be in (0, 1), got {self.tau}")
        check(isinstance(self.max_experts, int) and self.max_experts >= 1,
              f"DOEConfig.max_experts must be an integer >= 1, got {self.max_experts!r}")
        check(self.capacity_factor > 0, f"DOEConfig.capacity_factor must be > 0, got {self.capacity_factor}")
        check(self.gate_supervision in GATE_SUPERVISION,
              f"DOEConfig.gate_supervision must be one of {GATE_SUPERVISION}, got {self.gate_supervision!r}")
        check(self.gate_loss_weight >= 0, f"DOEConfig.gate_loss_weight must be >= 0, got {self.gate_loss_weight}")

    @property
    def hidden(self) -> int:
        return self.expert_hidden or (self.lm.intermediate_size if isinstance(self.lm, LlamaConfig) else self.lm.mlp_dim)

    def is_moe(self, layer: int) -> bool:
        return layer >= self.gate_layer and layer % self.moe_every == self.moe_every - 1


@dataclass
class DOEOutput(LMOutput):
    routing: Routing | None = None  # the per-sequence decision used by every MoE layer


class DOETransformer(CausalLM):
    """A :class:`CausalLM` whose MoE blocks share one per-sequence routing (see module docstring)."""

    def __init__(self, embedding: nn.Embedding, blocks: Iterable[nn.Module], gate: SequenceGate,
                 norm: nn.Module | None = None, *, config: DOEConfig, lm_head: nn.Linear | None = None) -> None:
        super().__init__(embedding, blocks, norm, config=config.lm, builder=None, lm_head=lm_head)
        self.gate = gate
        self.doe_config = config
        self.moe_layers = [i for i, b in enumerate(self.blocks) if isinstance(getattr(b, "mlp", None), SequenceMoE)]
        if not self.moe_layers:
            raise ConfigError("DOETransformer: no block has a SequenceMoE MLP")
        for i in self.moe_layers:
            if set(self.blocks[i].mlp.names) != set(gate.names):
                raise ConfigError(f"DOETransformer: layer {i} experts {list(self.blocks[i].mlp.names)} != "
                                  f"gate experts {list(gate.names)}")

    # -- introspection ----------------------------------------------------------------------
    @property
    def expert_names(self) -> tuple[str, ...]:
        return self.gate.names

    def moe(self, layer: int) -> SequenceMoE:
        return self.blocks[layer].mlp

    def active_params(self) -> int:
        """Parameters one sequence uses with ``max_experts`` experts (embedding counted once, gates excluded)."""
        total = sum(p.numel() for n, p in self.named_parameters() if ".experts." not in n and not n.startswith("gate."))
        per_expert = sum(p.numel() for p in self.moe(self.moe_layers[0]).experts[self.expert_names[0]].parameters())
        return total + per_expert * len(self.moe_layers) * min(self.gate.max_experts, len(self.expert_names))

    # -- routing ----------------------------------------------------------------------------
    def pooled(self, input_ids: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
        """(B, D): the residual stream entering the first MoE layer, mean-pooled over the prompt (what the gates read)."""
        x = self.embedding(input_ids)
        for i in range(self.moe_layers[0]):
            x, _ = self.blocks[i](x, None)
        return pool_prompt(x, prompt_mask)

    def route(self, input_ids: Tensor, prompt_mask: Tensor | None = None, **gate_kw) -> Routing:
        """The routing a forward pass would decide for ``input_ids`` (B, T) without running the MoE layers."""
        return self.gate(self.pooled(input_ids, prompt_mask), **gate_kw)

    @staticmethod
    def state_routing(state: LMState | None, layer: int) -> Routing | None:
        if state is None:
            return None
        s = state.layers[layer]
        return s.mlp if isinstance(s, BlockState) else None

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        state: LMState | None = None,
        *,
        logits_to_keep: int = 0,
        prompt_mask: Tensor | None = None,
        routing: Routing | None = None,
        force: Tensor | None = None,
        capacity: bool | None = None,
    ) -> DOEOutput:
        """``input_ids`` (B, T) -> logits; routes once unless ``routing`` or the decoding state has one.

        ``prompt_mask`` (B, T) bool: the positions pooled for routing (default: all of them).
        ``force`` (B, E) int: per-expert acceptance override; ``capacity``: capacity assignment (default
        in training) or threshold routing (see :meth:`SequenceGate.forward`).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"DOETransformer: input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        if state is not None and len(state.layers) != len(self.blocks):
            raise ValueError(f"DOETransformer: state has {len(state.layers)} layers, model has {len(self.blocks)}")
        if routing is None:
            routing = self.state_routing(state, self.moe_layers[0])
        x = self.embedding(input_ids)  # (B, T, D)
        new_layers = []
        for i, blk in enumerate(self.blocks):
            s = None if state is None else state.layers[i]
            if i in self.moe_layers:
                if routing is None:
                    routing = self.gate(pool_prompt(x, prompt_mask), force=force, capacity=capacity)
                s = BlockState(None if s is None else s.mixer, routing)
            x, s = blk(x, s)
            new_layers.append(s)
        hidden = self.norm(x)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return DOEOutput(self.head(kept), None if state is None else LMState(new_layers), hidden, routing)

    def gate_loss(self, routing: Routing, labels: Tensor | None = None) -> Tensor:
        """The configured gate loss (labels only used when ``gate_supervision == 'router'``)."""
        use = labels if self.doe_config.gate_supervision == "router" else None
        if self.doe_config.gate_supervision == "router" and labels is None:
            raise ConfigError("DOETransformer.gate_loss: gate_supervision='router' needs per-sequence labels")
        return gate_loss(routing, use)

    # -- flexible experts -------------------------------------------------------------------
    def _set_experts(self) -> None:
        names, bb = list(self.gate.names), self.doe_config.backbone
        if bb is not None:  # a removed expert's kind goes with it
            bb = bb.replace(kinds={k: v for k, v in bb.kinds.items() if k in names})
        self.doe_config = self.doe_config.replace(experts=names, late_experts=list(self.gate.late), backbone=bb)

    def add_expert(self, name: str, *, init_from: str | None = None, modules: Sequence[nn.Module] | None = None) -> None:
        """Add expert ``name``: one SwiGLU per MoE layer (fresh init, a copy of ``init_from``, or ``modules``) and a gate.

        The new gate starts rejecting every sequence and is never the default expert, so until it
        is trained (see :meth:`freeze_except`) every output is unchanged.
        """
        check_name(name)
        if name in self.gate.names:
            raise ConfigError(f"DOETransformer.add_expert: expert {name!r} already exists (have {list(self.expert_names)})")
        if init_from is not None and init_from not in self.gate.names:
            raise ConfigError(f"DOETransformer.add_expert: init_from={init_from!r} is not an expert ({list(self.expert_names)})")
        if modules is not None and len(modules) != len(self.moe_layers):
            raise ConfigError(f"DOETransformer.add_expert: got {len(modules)} modules for {len(self.moe_layers)} MoE layers")
        dev = self.embedding.weight.device
        for j, i in enumerate(self.moe_layers):
            if modules is not None:
                m = modules[j]
            elif init_from is not None:
                m = copy.deepcopy(self.moe(i).experts[init_from])
            else:
                m = SwiGLU(self.d_model, self.doe_config.hidden)
                init_lm_weights(m, getattr(self.doe_config.lm, "init_std", 0.02), self.doe_config.n_layers)
            self.moe(i).add_expert(name, m.to(dev))
        self.gate.add_expert(name, late=True)
        self._set_experts()

    def remove_expert(self, name: str) -> None:
        """Remove expert ``name`` from every MoE layer and the gate."""
        if name not in self.gate.names:
            raise ConfigError(f"DOETransformer.remove_expert: no expert {name!r} (have {list(self.expert_names)})")
        self.gate.remove_expert(name)
        for i in self.moe_layers:
            self.moe(i).remove_expert(name)
        self._set_experts()

    def expert_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that belong to expert ``name`` only: its SwiGLUs and its gate (w_e, b_e)."""
        if name not in self.gate.names:
            raise ConfigError(f"DOETransformer: no expert {name!r} (have {list(self.expert_names)})")
        params = [p for i in self.moe_layers for p in self.moe(i).experts[name].parameters()]
        return params + self.gate.gate_parameters(name)

    def freeze_except(self, name: str) -> list[nn.Parameter]:
        """Freeze every parameter but expert ``name``'s (MLPs + gate); returns the trainable ones."""
        return train_only(self, self.expert_parameters(name))

    def extract(self, experts: Sequence[str]) -> "DOETransformer":
        """A copy holding only ``experts``; identical outputs on sequences whose routed experts are all kept."""
        experts = list(experts)
        unknown = [e for e in experts if e not in self.gate.names]
        if not experts or unknown:
            raise ConfigError(f"DOETransformer.extract: experts {experts} must be a non-empty subset of "
                              f"{list(self.expert_names)} (unknown: {unknown})")
        small = copy.deepcopy(self)
        drop = [n for n in self.gate.names if n not in experts]
        for n in drop:
            small.remove_expert(n)
        return small

    def count_params(self) -> dict[str, int]:
        experts = sum(p.numel() for i in self.moe_layers for p in self.moe(i).experts.parameters())
        gate = sum(p.numel() for p in self.gate.parameters())
        return {"total": self.num_params(), "experts": experts, "gates": gate, "active": self.active_params()}


# --------------------------------------------------------------------------------- building
def build_doe(cfg: DOEConfig, embedding: nn.Embedding | None = None,
              expert_factory: Any | None = None) -> DOETransformer:
    """Build a DOE transformer from its config (``embedding`` shares an existing one).

    ``expert_factory(layer, name) -> nn.Module`` replaces the default SwiGLU experts. A config
    on a backbone (``cfg.backbone``) is built by :func:`taskmoe.doe.upcycle.upcycle_model` instead.
    """
    if cfg.backbone is not None or isinstance(cfg.lm, LlamaConfig):
        raise ConfigError("build_doe: this DOEConfig is on a pretrained backbone; use taskmoe.doe.upcycle "
                          "(upcycle_model / load_upcycled)")
    d, H = cfg.lm.d_model, cfg.hidden
    make = expert_factory or (lambda i, n: SwiGLU(d, H))

    def mlp(i: int) -> nn.Module:
        if cfg.is_moe(i):
            return SequenceMoE({n: make(i, n) for n in cfg.experts})
        return SwiGLU(d, cfg.lm.mlp_dim)

    base = transformer_lm(cfg.lm, embedding, mlp_factory=mlp)
    gate = SequenceGate(d, cfg.experts, tau=cfg.tau, max_experts=cfg.max_experts,
                        capacity_factor=cfg.capacity_factor, late=cfg.late_experts)
    return DOETransformer(base.embedding, list(base.blocks), gate, base.norm, config=cfg)


def save_doe(model: DOETransformer, folder: str | Path, *, meta: Mapping[str, Any] | None = None,
             extra_files: Mapping[str, Callable[[Path], None]] | None = None) -> Path:
    """Write ``model`` as a ``doe`` component folder (config.json + model.safetensors), atomically.

    ``extra_files`` (name -> writer) adds files such as ``tokenizer.json``. An upcycled model stores
    only its gates and added experts (:func:`taskmoe.doe.upcycle.save_upcycled`).
    """
    if model.doe_config.backbone is not None:
        from taskmoe.doe.upcycle import save_upcycled  # upcycle builds on this module

        return save_upcycled(model, folder, meta=meta, extra_files=extra_files)
    return save_component(folder, KIND, model.doe_config.to_dict(), dict(model.state_dict()), meta=meta,
                          extra_files=extra_files)


def load_doe(folder: str | Path, *, device: str | torch.device = "cpu") -> DOETransformer:
    """Rebuild a DOE model from its folder, checking every tensor name and shape."""
    comp = load_component(folder, KIND)
    source = comp.folder / CONFIG_FILE
    cfg = DOEConfig.from_dict(comp.config, source=str(source))
    if cfg.backbone is not None:
        from taskmoe.doe.upcycle import load_upcycled  # upcycle builds on this module

        return load_upcycled(folder, device=device)
    model = build_doe(cfg)
    tensors = comp.tensors()
    check_state(model.state_dict(), tensors, comp.weights)
    model.load_state_dict(tensors)
    if list(model.gate.names) != cfg.experts:
        raise CheckpointError(f"{source}: expert order {list(model.gate.names)} != config {cfg.experts}")
    return model.to(device)
