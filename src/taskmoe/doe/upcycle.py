"""DOE upcycling of a pretrained backbone: its MLPs become ``SequenceMoE`` layers (``taskmoe doe upcycle``).

Every block ``i >= gate_layer`` of the backbone keeps its attention and gets a
:class:`~taskmoe.doe.seq_moe.SequenceMoE` whose expert ``base`` *is* the original
:class:`~taskmoe.layers.GatedMLP` (the same module, frozen); added experts are

- ``copy`` — a full copy of the MLP (Branch-Train-MiX / sparse upcycling), or
- ``lora`` — :class:`LoRAMLP`: the original MLP's weights (shared, not copied) plus the expert's own
  LoRA update on ``gate_proj``/``up_proj``/``down_proj`` (a cheap expert: ``3 r (d + h)`` parameters per layer).

Routing is the DOE rule (:mod:`taskmoe.doe.routing`): each expert owns a gate on the residual stream
entering block ``gate_layer`` mean-pooled over the prompt, accepts a sequence when its score exceeds
``tau``, and up to ``max_experts`` accepting experts serve it with weights ``p_e / sum p``. The
gate of ``base`` never accepts (``w = 0``, ``b = logit(tau) - 1``): ``base`` serves only the
sequences no other gate accepts, as the default. Added experts are *late* (never the default), so:

- adding an expert leaves every other expert's parameters and every sequence its gate rejects
  bit-identical; removing every added expert leaves the backbone itself (weight 1.0 exactly on
  ``base``, no multiply), so the logits equal the backbone's (tested with ``torch.equal``);
- a ``lora`` expert routed alone computes exactly what the backbone with the same LoRA adapter
  (:mod:`taskmoe.layers.lora`, same op order) computes, so an adapter trained on the backbone
  becomes an expert with :func:`expert_from_adapter` and gives the same outputs.

**Centroid gates** (FlexOlmo's domain-embedding router rows, :func:`centroid_gates`): with
``f = norm(pooled h)`` the gate's input, ``mu_e`` the mean of ``f`` over expert ``e``'s data and
``mu`` the mean of all the ``mu_e``, the gate direction is ``u_e = (mu_e - mu) / |mu_e - mu|``.
With ``s_in`` / ``s_out`` the mean projections ``u_e . f`` on ``e``'s data and on the others',
``m = (s_in - s_out) / 2``, the row is ``w_e = (k / m) u_e`` and ``b_e = logit(tau) - k (s_in +
s_out) / (2 m)``: the score is ``sigmoid(logit(tau) + k)`` at ``e``'s own mean, ``sigmoid(logit(tau) - k)``
at the others', and ``tau`` half-way (``k`` = ``sharpness``). :func:`train_gates` then trains the added
gates alone (binary cross-entropy against multi-label targets) on cached features: nothing before
``gate_layer`` changes, so the features need one forward.

**Folder** (kind ``"doe"``): ``config.json`` holds the :class:`~taskmoe.doe.model.DOEConfig` with
``lm`` = the backbone's :class:`~taskmoe.models.backbones.LlamaConfig` and ``backbone`` = a
:class:`~taskmoe.doe.model.BackboneSpec` (the backbone folder path, each added expert's kind, a
fingerprint of the backbone's weight files); ``model.safetensors`` holds only the gates and the added
experts' own tensors. Loading reads the backbone folder and refuses, naming the field, a missing
folder, another architecture or changed weights.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
import typer
from torch import Tensor, nn

from taskmoe.doe.model import KIND, BackboneSpec, DOEConfig, DOETransformer
from taskmoe.doe.seq_moe import SequenceGate, SequenceMoE, check_name
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import CONFIG_FILE, WEIGHTS_FILE, check_state, load_component, save_component
from taskmoe.layers.lora import ADAPTER_KIND
from taskmoe.layers.mlp import GatedMLP
from taskmoe.models.backbones import LlamaConfig, load_backbone, read_backbone_config
from taskmoe.models.model import CausalLM

__all__ = ["BASE", "LoRAMLP", "upcycle_config", "upcycle_model", "add_backbone_expert", "expert_from_adapter",
           "centroid_gates", "train_gates", "gate_features", "save_upcycled", "load_upcycled", "backbone_fingerprint",
           "backbone_base", "own_tensors",
           "doe_upcycle"]

BASE = "base"
PROJ = ("gate_proj", "up_proj", "down_proj")
FINGERPRINT_BYTES = 1 << 20


# ------------------------------------------------------------------------------ experts
class LoRAMLP(nn.Module):
    """``down'(silu(gate'(x)) * up'(x))`` with ``P' x = P x + s B_P A_P x`` on each projection P of a shared MLP.

    The base :class:`GatedMLP` is held, not registered (it is expert ``base`` of the same layer), so
    its weights are stored once and stay frozen; only ``lora_A`` (r, in) / ``lora_B`` (out, r) are
    this module's parameters. ``B = 0`` at creation, so a new expert equals ``base``.
    """

    def __init__(self, base: GatedMLP, rank: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(base, GatedMLP):
            raise ConfigError(f"LoRAMLP wraps a GatedMLP (a backbone's MLP), got {type(base).__name__}")
        if rank < 1:
            raise ConfigError(f"LoRAMLP: rank must be >= 1, got {rank}")
        self._base = (base,)
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / int(rank)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        w = base.gate_proj.weight
        for p in PROJ:
            lin: nn.Linear = getattr(base, p)
            a = torch.empty(rank, lin.in_features, device=w.device, dtype=w.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[p] = nn.Parameter(a)
            self.lora_B[p] = nn.Parameter(torch.zeros(lin.out_features, rank, device=w.device, dtype=w.dtype))

    @property
    def base(self) -> GatedMLP:
        return self._base[0]

    def _proj(self, name: str, x: Tensor) -> Tensor:
        y = getattr(self.base, name)(x)  # the same op order as layers.lora.LoRALinear
        return y + F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name]) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self._proj("down_proj", F.silu(self._proj("gate_proj", x)) * self._proj("up_proj", x))

    def delta_weight(self, name: str) -> Tensor:
        """``s B A`` (out, in) of projection ``name``."""
        return self.scale * (self.lora_B[name] @ self.lora_A[name])

    def extra_repr(self) -> str:
        return f"r={self.rank}, alpha={self.alpha:g}"


def _new_expert(base: GatedMLP, kind: str, spec: BackboneSpec) -> nn.Module:
    if kind == "copy":
        m = copy.deepcopy(base)
        return m.requires_grad_(True)
    if kind == "lora":
        return LoRAMLP(base, spec.lora_rank, spec.lora_alpha)
    raise ConfigError(f"expert kind must be 'copy' or 'lora', got {kind!r}")


# ------------------------------------------------------------------------------ building
def upcycle_config(backbone_dir: str | Path, lm: LlamaConfig, *, gate_layer: int = 0, tau: float = 0.5,
                   max_experts: int = 2, lora_rank: int = 8, lora_alpha: float = 16.0) -> DOEConfig:
    """The config of a freshly upcycled backbone: experts ``[base]``, nothing added yet."""
    path = Path(backbone_dir)
    spec = BackboneSpec(path=str(path.resolve()), lora_rank=lora_rank, lora_alpha=lora_alpha,
                        fingerprint=backbone_fingerprint(path) if path.is_dir() else "")
    return DOEConfig(lm=lm, experts=[BASE], late_experts=[], gate_layer=gate_layer, tau=tau, max_experts=max_experts,
                     backbone=spec)


def upcycle_model(backbone: CausalLM, cfg: DOEConfig) -> DOETransformer:
    """Turn ``backbone`` (our Llama ``CausalLM``; modified in place) into a DOE model with ``cfg``'s experts.

    Expert ``base`` of each MoE block is the block's own MLP; every other expert of ``cfg.experts`` is
    created with its kind from ``cfg.backbone.kinds`` (LoRA B = 0, so outputs are unchanged until trained).
    """
    if cfg.backbone is None or not isinstance(cfg.lm, LlamaConfig):
        raise ConfigError("upcycle_model: needs a DOEConfig with lm = LlamaConfig and backbone set (see upcycle_config)")
    if not cfg.experts or cfg.experts[0] != BASE:
        raise ConfigError(f"upcycle_model: the first expert must be {BASE!r}, got {cfg.experts}")
    if len(backbone.blocks) != cfg.n_layers or backbone.d_model != cfg.d_model:
        raise ConfigError(f"upcycle_model: backbone has {len(backbone.blocks)} blocks of width {backbone.d_model}, "
                          f"config says {cfg.n_layers} x {cfg.d_model}")
    added = cfg.experts[1:]
    missing = [e for e in added if e not in cfg.backbone.kinds]
    if missing:
        raise ConfigError(f"upcycle_model: no kind for expert(s) {missing} in backbone.kinds {cfg.backbone.kinds}")
    for p in backbone.parameters():
        p.requires_grad_(False)
    for i, blk in enumerate(backbone.blocks):
        if not cfg.is_moe(i):
            continue
        base = blk.mlp
        if not isinstance(base, GatedMLP):
            raise ConfigError(f"upcycle_model: block {i} MLP is a {type(base).__name__}, not a backbone GatedMLP")
        blk.mlp = SequenceMoE({BASE: base, **{e: _new_expert(base, cfg.backbone.kinds[e], cfg.backbone) for e in added}})
    gate = SequenceGate(cfg.d_model, [BASE], tau=cfg.tau, max_experts=cfg.max_experts,
                        capacity_factor=cfg.capacity_factor)
    with torch.no_grad():  # base never accepts: it is only the default
        gate.weight[BASE].zero_()
        gate.bias[BASE].fill_(math.log(cfg.tau / (1 - cfg.tau)) - 1.0)
    gate.requires_grad_(False)
    for e in added:
        gate.add_expert(e, late=True)
    gate.to(backbone.embedding.weight.device)
    return DOETransformer(backbone.embedding, list(backbone.blocks), gate, backbone.norm,
                          config=cfg.replace(late_experts=list(added)), lm_head=backbone.lm_head)


def add_backbone_expert(model: DOETransformer, name: str, kind: str = "lora") -> list[nn.Parameter]:
    """Add expert ``name`` (``copy`` or ``lora``) to every MoE block and a gate that rejects everything;
    returns its parameters (its experts and its gate row), the only ones left trainable."""
    bb = _spec(model)
    check_name(name)
    mods = [_new_expert(model.moe(i).experts[BASE], kind, bb) for i in model.moe_layers]
    model.add_expert(name, modules=mods)
    model.doe_config = model.doe_config.replace(backbone=bb.replace(kinds={**bb.kinds, name: kind}))
    return model.freeze_except(name)


def _spec(model: DOETransformer) -> BackboneSpec:
    if model.doe_config.backbone is None:
        raise ConfigError("not an upcycled DOE model (its config has no backbone)")
    return model.doe_config.backbone


@torch.no_grad()
def expert_from_adapter(model: DOETransformer, name: str, adapter_dir: str | Path) -> None:
    """Set ``lora`` expert ``name`` to a LoRA adapter folder trained on the backbone (``layers.lora`` format).

    The adapter must cover only MLP projections of MoE blocks (``blocks.{i}.mlp.{gate,up,down}_proj``,
    ``i >= gate_layer``) with the expert's rank; anything else is a CheckpointError naming the module.
    """
    bb = _spec(model)
    if bb.kinds.get(name) != "lora":
        raise ConfigError(f"expert_from_adapter: {name!r} is not a 'lora' expert (kinds: {bb.kinds})")
    comp = load_component(adapter_dir, ADAPTER_KIND)
    modules = comp.config.get("modules") or {}
    tensors = comp.tensors()
    moe = set(model.moe_layers)
    for m, mc in modules.items():
        parts = m.split(".")
        ok = len(parts) == 4 and parts[0] == "blocks" and parts[2] == "mlp" and parts[3] in PROJ and \
            parts[1].isdigit() and int(parts[1]) in moe
        if not ok:
            raise CheckpointError(f"{comp.folder}: adapter module {m!r} is not an MLP projection of a MoE block "
                                  f"(MoE blocks: {sorted(moe)[:3]}...{sorted(moe)[-1]}); train it with targets "
                                  "restricted to blocks >= gate_layer, mlp.{gate,up,down}_proj")
        exp: LoRAMLP = model.moe(int(parts[1])).experts[name]
        if mc.get("rank") != exp.rank or float(mc.get("alpha", 0)) != exp.alpha:
            raise CheckpointError(f"{comp.folder}: module {m!r} has r={mc.get('rank')}, alpha={mc.get('alpha')}; "
                                  f"expert {name!r} has r={exp.rank}, alpha={exp.alpha}")
        exp.lora_A[parts[3]].copy_(tensors[f"{m}.lora_A"])
        exp.lora_B[parts[3]].copy_(tensors[f"{m}.lora_B"])


# ------------------------------------------------------------------------------ gates
@torch.no_grad()
def gate_features(model: DOETransformer, seqs: Sequence[Sequence[int]]) -> Tensor:
    """(N, D) gate inputs ``norm(pooled h)`` of token sequences, one forward each (no padding)."""
    dev = model.embedding.weight.device
    rows = [model.gate.norm(model.pooled(torch.tensor([list(s)], device=dev)))[0] for s in seqs]
    return torch.stack(rows).float()


@torch.no_grad()
def centroid_gates(model: DOETransformer, features: Mapping[str, Tensor], *, sharpness: float = 2.0) -> dict[str, float]:
    """Set each named expert's gate row from domain centroids of ``features[e]`` (N_e, D); see the module docstring.

    Returns each expert's ``m`` (half the gap between own and other mean projections; <= 0 means the
    domains do not separate along that direction and the gate is left unchanged).
    """
    if len(features) < 2:
        raise ConfigError("centroid_gates: needs the features of at least two experts' data")
    mus = {e: f.mean(0) for e, f in features.items()}
    mu = torch.stack(list(mus.values())).mean(0)
    tau = model.gate.tau
    margins: dict[str, float] = {}
    for e, f in features.items():
        if e not in model.gate.names:
            raise ConfigError(f"centroid_gates: no expert {e!r} (have {list(model.gate.names)})")
        u = mus[e] - mu
        u = u / u.norm().clamp_min(1e-12)
        s_in = float((f @ u).mean())
        others = torch.cat([g for k, g in features.items() if k != e])
        s_out = float((others @ u).mean())
        m = (s_in - s_out) / 2
        margins[e] = m
        if m <= 0:
            continue
        w = model.gate.weight[e]
        w.copy_((sharpness / m) * u.to(w.dtype))
        model.gate.bias[e].fill_(math.log(tau / (1 - tau)) - sharpness * (s_in + s_out) / (2 * m))
    return margins


def train_gates(model: DOETransformer, features: Tensor, targets: Tensor, experts: Sequence[str], *, steps: int = 200,
                lr: float = 0.05, weight_decay: float = 1e-3) -> list[float]:
    """Train the gate rows of ``experts`` alone: BCE of ``sigmoid(w_e . f + b_e)`` against ``targets`` (N, E') in {0, 1}.

    Full-batch AdamW on cached features (nothing before ``gate_layer`` trains). Returns the losses.
    """
    if targets.shape != (features.shape[0], len(experts)):
        raise ConfigError(f"train_gates: targets shape {tuple(targets.shape)} != (N, E') = "
                          f"{(features.shape[0], len(experts))}")
    params = [p for e in experts for p in model.gate.gate_parameters(e)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        logits = torch.stack([features @ model.gate.weight[e].float() + model.gate.bias[e].float() for e in experts], 1)
        loss = F.binary_cross_entropy_with_logits(logits, targets.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ------------------------------------------------------------------------------ folder
def backbone_fingerprint(folder: str | Path) -> str:
    """blake2b over each weight file's name, size and first/last MiB (cheap; changes when the weights do)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weight files (not a backbone folder)")
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            fh.seek(max(0, size - FINGERPRINT_BYTES))
            h.update(fh.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def own_tensors(model: DOETransformer) -> dict[str, Tensor]:
    """The gates and the added experts' own tensors (the base weights stay in the backbone folder)."""
    own = tuple(f".mlp.experts.{e}." for e in model.expert_names if e != BASE)
    return {k: v for k, v in model.state_dict().items() if k.startswith("gate.") or any(s in k for s in own)}


def save_upcycled(model: DOETransformer, folder: str | Path, *, meta: Mapping[str, Any] | None = None,
                  extra_files: Mapping[str, Any] | None = None) -> Path:
    """Write an upcycled model's folder (kind ``doe``): its config and only its own tensors."""
    _spec(model)
    return save_component(folder, KIND, model.doe_config.to_dict(), own_tensors(model), meta=meta,
                          extra_files=extra_files)


def backbone_base(cfg: DOEConfig, source: str, *, device: str | torch.device = "cpu",
                  with_tokenizer: bool = False) -> Any:
    """The upcycled model of ``cfg`` (read from ``source``) on its backbone folder, checked (path, architecture,
    fingerprint), with its added experts freshly built (their stored tensors are the caller's to load)."""
    if cfg.backbone is None:
        raise CheckpointError(f"{source}: not an upcycled DOE model (no 'backbone' field); use taskmoe.doe.load_doe")
    path = Path(cfg.backbone.path)
    if not path.is_dir():
        raise CheckpointError(f"{source}: backbone.path {str(path)!r} not found; the upcycled model stores only its "
                              "gates and added experts, so its backbone folder must stay in place")
    have = read_backbone_config(path)
    if have != cfg.lm:
        diff = sorted(k for k, v in have.to_dict().items() if cfg.lm.to_dict().get(k) != v)
        raise CheckpointError(f"{source}: backbone {path} has another architecture than the one upcycled "
                              f"(fields differ: {diff})")
    if cfg.backbone.fingerprint and backbone_fingerprint(path) != cfg.backbone.fingerprint:
        raise CheckpointError(f"{source}: backbone {path} weights changed since upcycling "
                              f"(backbone.fingerprint {cfg.backbone.fingerprint} != {backbone_fingerprint(path)})")
    backbone, tok = load_backbone(path, device=device)
    model = upcycle_model(backbone, cfg)
    return (model, tok) if with_tokenizer else model


def load_upcycled(folder: str | Path, *, device: str | torch.device = "cpu", with_tokenizer: bool = False) -> Any:
    """Rebuild an upcycled model: the referenced backbone folder, checked, plus the stored gates and experts."""
    comp = load_component(folder, KIND)
    source = str(comp.folder / CONFIG_FILE)
    model, tok = backbone_base(DOEConfig.from_dict(comp.config, source=source), source, device=device, with_tokenizer=True)
    tensors = comp.tensors()
    check_state(own_tensors(model), tensors, comp.folder / WEIGHTS_FILE)
    model.load_state_dict(tensors, strict=False)
    return (model.eval(), tok) if with_tokenizer else model.eval()


# ------------------------------------------------------------------------------ CLI
def doe_upcycle(
    backbone: Annotated[Path, typer.Option(help="the backbone folder (taskmoe backbone import)")],
    out: Annotated[Path, typer.Option(help="the upcycled model folder to write")],
    experts: str = "legal,chat",
    kind: str = "lora",
    adapters: Optional[list[str]] = None,
    gate_layer: int = 0,
    tau: float = 0.5,
    max_experts: int = 2,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
) -> dict[str, Any]:
    """Turn a backbone's MLPs into sequence-routed experts: taskmoe doe upcycle --backbone DIR --experts a,b --out DIR.

    Expert 'base' is each MLP itself (frozen, the default for sequences no gate accepts); each name in
    --experts adds a full copy of every MLP (--kind copy) or the MLP plus a LoRA update (--kind lora,
    rank --lora-rank). Blocks before --gate-layer stay dense; the gates read the residual stream entering
    it. --adapters NAME=DIR (repeatable) fills a lora expert from a LoRA adapter trained on the backbone
    (MLP projections of blocks >= gate-layer only). New gates reject everything until trained, so the
    written model computes the backbone's logits. OUT stores only gates and added experts and references DIR.
    """
    names = [n.strip() for n in experts.split(",") if n.strip()]
    if not names or BASE in names or len(set(names)) != len(names):
        raise ConfigError(f"doe upcycle: --experts must list distinct names other than {BASE!r}, got {experts!r}")
    fills = {}
    for a in adapters or []:
        if "=" not in a:
            raise ConfigError(f"doe upcycle: --adapters takes NAME=DIR, got {a!r}")
        n, d = a.split("=", 1)
        if n not in names:
            raise ConfigError(f"doe upcycle: --adapters names {n!r}, not one of --experts {names}")
        fills[n] = Path(d)
    lm_model, _ = load_backbone(backbone)
    cfg = upcycle_config(backbone, read_backbone_config(backbone), gate_layer=gate_layer, tau=tau,
                         max_experts=max_experts, lora_rank=lora_rank, lora_alpha=lora_alpha)
    model = upcycle_model(lm_model, cfg)
    for n in names:
        add_backbone_expert(model, n, kind)
        if n in fills:
            expert_from_adapter(model, n, fills[n])
    folder = save_upcycled(model, out, meta={"backbone": str(backbone)})
    own = sum(t.numel() for t in own_tensors(model).values())
    return {"model": str(folder), "experts": list(model.expert_names), "moe_layers": len(model.moe_layers),
            "stored_params": own, "backbone": cfg.backbone.path}
