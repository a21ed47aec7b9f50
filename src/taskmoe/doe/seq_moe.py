"""``SequenceMoE``: an MLP layer whose experts take whole sequences, and ``SequenceGate``, their gates.

The DOE seed replaces a transformer's MLPs by experts but routes *sequences*, not tokens, and
lets each expert own the gate that decides whether it takes an input. Here:

- :class:`SequenceGate` holds one gate ``(w_e, b_e)`` per expert, scored on the prompt-pooled
  sequence representation: ``p_e = sigmoid(w_e . norm(h) + b_e)``. In eval expert ``e`` accepts a
  sequence iff ``p_e > tau``; in training experts take sequences by score under a capacity
  (balanced assignment), see :mod:`taskmoe.doe.routing` for the rule, the default and the weights.
- :class:`SequenceMoE` holds the experts (any ``(…, D) -> (…, D)`` module, normally
  :class:`taskmoe.layers.SwiGLU`) by name and applies a :class:`~taskmoe.doe.routing.Routing`.

Design choices:

- **Experts by name, one module each** (``nn.ModuleDict``), not one stacked ``(E, D, H)``
  parameter. Per-expert tensors are what make "train only the new expert, everything else
  frozen" exact: AdamW on a shared stacked tensor would still decay and move the frozen rows.
  ``add_expert`` / ``remove_expert`` / extraction also never reallocate the other experts.
  Training runs one dense matmul per expert on its contiguous block of rows. Inference (no
  autograd) of a mixed batch uses :class:`StackedSwiGLU`, a versioned stacked ``(E, D, H)`` copy
  of the weights, for one ``torch.nn.functional.grouped_mm`` per projection over all experts
  (``bench/doe_moe.py`` measures both).
- **Dispatch without loops over tokens or sequences** (:func:`dispatch`): the plan cached on the
  routing sorts the (row, expert) pairs by expert once; a call gathers the rows with
  ``index_select``, runs the experts on their contiguous slices, scales by the weights and
  scatters back with ``index_copy_`` (one expert per row) or ``index_add_``. The only Python loop
  is over experts. :func:`dispatch_ref` is the plain per-sequence loop kept as the test twin.
- **Expert-grouped fast path**: when every row of the batch has the same experts (a scheduler
  grouped them at prefill and the order never changes), the layer runs those experts on the batch
  as is: no gather, no scatter, no multiply when the weight is 1 — a dense MLP's cost.
- **Routing is an input.** The layer never re-routes on its own input when given a routing; a
  DOE model routes once from the prompt and passes the same object to every layer and step. A
  standalone layer built with a gate can route itself (:meth:`SequenceMoE.route`).
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.doe.routing import Routing, balanced_assignment, capacity_for, decide, pool_prompt
from taskmoe.errors import ConfigError
from taskmoe.layers.mlp import SwiGLU
from taskmoe.layers.norm import RMSNorm

NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
REJECT_MARGIN = 1.0  # a new gate starts with w = 0, b = logit(tau) - 1: p = 0.27 at tau = 0.5 on every sequence


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"expert name {name!r} must be non-empty and use only letters, digits, '_' and '-'")
    return name


# ---------------------------------------------------------------------------------- gate
class SequenceGate(nn.Module):
    """Per-expert gates over a pooled sequence representation; produces a :class:`Routing`.

    ``late`` experts (added after training via :meth:`add_expert`) are never the default for a
    sequence no gate accepts; they serve only what their own gate accepts.
    """

    def __init__(
        self,
        d_model: int,
        names: Sequence[str],
        *,
        tau: float = 0.5,
        max_experts: int = 2,
        capacity_factor: float = 1.0,
        norm: nn.Module | None = None,
        late: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not names:
            raise ConfigError("SequenceGate: needs at least one expert name")
        if len(set(names)) != len(names):
            raise ConfigError(f"SequenceGate: duplicate expert names in {list(names)}")
        if not 0.0 < tau < 1.0:
            raise ConfigError(f"SequenceGate: tau must be in (0, 1), got {tau}")
        if max_experts < 1 or capacity_factor <= 0:
            raise ConfigError(f"SequenceGate: max_experts >= 1 and capacity_factor > 0 needed, "
                              f"got {max_experts}, {capacity_factor}")
        self.d_model, self.tau, self.max_experts, self.capacity_factor = d_model, float(tau), int(max_experts), float(capacity_factor)
        self.norm = norm if norm is not None else RMSNorm(d_model)
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        std = 1.0 / math.sqrt(d_model)  # logits ~ N(0, 1) on a unit-RMS input
        for n in names:
            check_name(n)
            self.weight[n] = nn.Parameter(torch.randn(d_model) * std)
            self.bias[n] = nn.Parameter(torch.zeros(()))
        self.late: list[str] = [n for n in late if n in self.weight]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.weight.keys())

    def eligible(self) -> Tensor:
        """(E,) bool: experts that may take a sequence no gate accepts."""
        return torch.tensor([n not in self.late for n in self.names], device=self.norm_device())

    def norm_device(self) -> torch.device:
        return next(iter(self.weight.values())).device

    def scores(self, h: Tensor) -> Tensor:
        """Gate probabilities (B, E): ``p[:, e] = sigmoid(norm(h) . w_e + b_e)``, columns in name order.

        Each column is its own matrix-vector product and sigmoid, so an expert's score never
        depends on which other experts exist (a stacked matmul's blocking, or a vectorised
        sigmoid's tail handling, changes with E in the last bit, and adding an expert must leave
        the other experts' routing bit-identical).
        """
        hn = self.norm(h)  # (B, D)
        return torch.stack([torch.sigmoid(torch.mv(hn, self.weight[n]) + self.bias[n]) for n in self.names], dim=1)

    def forward(self, h: Tensor, *, force: Tensor | None = None, capacity: bool | None = None) -> Routing:
        """Route pooled representations ``h`` (B, D).

        ``capacity`` (default: ``self.training``) selects the capacity-constrained assignment
        (``C = ceil(capacity_factor * K * B / E)``) instead of the threshold ``p > tau``. ``force`` (B, E)
        int overrides acceptance where it is >= 0 (1 accept, 0 reject; used to teacher-force a
        new expert on its own data).
        """
        p = self.scores(h)  # (B, E)
        use_capacity = self.training if capacity is None else capacity
        if use_capacity:
            K = min(self.max_experts, p.shape[1])
            accepted = balanced_assignment(p, capacity_for(p.shape[0], p.shape[1], self.capacity_factor, K), K)
        else:
            accepted = p.detach() > self.tau
        if force is not None:
            if force.shape != p.shape:
                raise ValueError(f"SequenceGate: force shape {tuple(force.shape)} != scores shape {tuple(p.shape)}")
            accepted = torch.where(force >= 0, force > 0, accepted)
        ids, weights, fallback = decide(p, accepted, self.max_experts, self.eligible())
        return Routing(self.names, ids, weights, p, accepted, fallback)

    # -- flexible experts -----------------------------------------------------------------
    def add_expert(self, name: str, weight: Tensor | None = None, bias: float | None = None, *, late: bool = True) -> None:
        """Add a gate; by default it starts rejecting everything (``w = 0``, ``b = logit(tau) - REJECT_MARGIN``)."""
        check_name(name)
        if name in self.weight:
            raise ConfigError(f"SequenceGate: expert {name!r} already exists (have {list(self.names)})")
        dev = self.norm_device()
        w = torch.zeros(self.d_model, device=dev) if weight is None else weight.detach().clone().to(dev)
        if w.shape != (self.d_model,):
            raise ConfigError(f"SequenceGate.add_expert({name!r}): weight shape {tuple(w.shape)} != ({self.d_model},)")
        b = math.log(self.tau / (1 - self.tau)) - REJECT_MARGIN if bias is None else float(bias)
        self.weight[name] = nn.Parameter(w)
        self.bias[name] = nn.Parameter(torch.tensor(b, device=dev))
        if late:
            self.late.append(name)

    def remove_expert(self, name: str) -> None:
        if name not in self.weight:
            raise ConfigError(f"SequenceGate: no expert {name!r} (have {list(self.names)})")
        if len(self.weight) == 1:
            raise ConfigError(f"SequenceGate: cannot remove {name!r}, the last expert")
        del self.weight[name]
        del self.bias[name]
        self.late = [n for n in self.late if n != name]

    def gate_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.weight[name], self.bias[name]]

    def extra_repr(self) -> str:
        return f"names={list(self.names)}, tau={self.tau}, max_experts={self.max_experts}, " \
               f"capacity_factor={self.capacity_factor}, late={self.late}"


# ------------------------------------------------------------------------------ dispatch
class StackedSwiGLU:
    """Inference-only stacked copies of SwiGLU experts' weights for :func:`torch.nn.functional.grouped_mm`.

    ``gate_up`` (E, D, 2H) and ``down`` (E, H, D), contiguous, in the order of the experts passed
    to :meth:`get`. Rebuilt whenever that order or any weight changes (the key holds each
    weight's storage pointer and version counter, which optimizer steps, ``load_state_dict`` and
    ``.to()`` all change), so it can never serve stale weights. Costs one extra copy of the
    experts' weights, built on the first mixed no-grad call; training never uses it.
    """

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def supports(experts: Sequence[nn.Module]) -> bool:
        return hasattr(F, "grouped_mm") and all(
            isinstance(e, SwiGLU) and e.gate_up.bias is None and e.down.bias is None for e in experts)

    def get(self, experts: Sequence[nn.Module]) -> tuple[Tensor, Tensor]:
        ws = [(e.gate_up.weight, e.down.weight) for e in experts]
        key = tuple((a.data_ptr(), a._version, b.data_ptr(), b._version, a.dtype, a.device) for a, b in ws)
        if key != self.key or self.value is None:
            gu = torch.stack([a.detach().t() for a, _ in ws]).contiguous()  # (E, D, 2H)
            dn = torch.stack([b.detach().t() for _, b in ws]).contiguous()  # (E, H, D)
            self.key, self.value = key, (gu, dn)
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None


def _grouped_mm_experts(xs: Tensor, splits: list[int], weights: tuple[Tensor, Tensor]) -> Tensor:
    """SwiGLU of rows ``xs`` (P, T, D) sorted by expert, two ``grouped_mm`` calls over all experts."""
    P, T, D = xs.shape
    gu, dn = weights
    H = dn.shape[1]
    offs = torch.tensor(splits, dtype=torch.int32).mul_(T).cumsum_(0).to(torch.int32).to(xs.device)  # row ends
    g, u = F.grouped_mm(xs.reshape(P * T, D), gu, offs=offs).split(H, dim=-1)  # (P*T, H) each
    return F.grouped_mm((F.silu(g) * u).contiguous(), dn, offs=offs).view(P, T, D)


def dispatch(x: Tensor, routing: Routing, experts: Sequence[nn.Module], stack: StackedSwiGLU | None = None) -> Tensor:
    """``y[b] = sum_k w[b, k] f_{ids[b, k]}(x[b])`` for ``x`` (B, T, D), experts in ``routing.names`` order.

    Grouped batch: the experts run on ``x`` directly. Otherwise: gather rows sorted by expert,
    one call per expert on its contiguous slice (or, without autograd and given ``stack``, one
    ``grouped_mm`` per projection over all experts), scale, scatter back. Contributions to a row
    are summed in ascending expert order on every path (and in :func:`dispatch_ref`).
    """
    B, T, D = x.shape
    plan = routing.plan
    w = routing.weights
    scale = not plan.unit or w.requires_grad
    if plan.group is not None:
        y = None
        for j, e in enumerate(plan.group):  # ascending expert order
            out = experts[e](x)
            if scale:
                out = out * w.gather(1, plan.slot[:, j : j + 1]).to(out.dtype).view(B, 1, 1)
            y = out if y is None else y + out
        return y
    xs = x.index_select(0, plan.rows)  # (P, T, D), rows sorted by expert
    if stack is not None and not torch.is_grad_enabled() and StackedSwiGLU.supports(experts):
        out = _grouped_mm_experts(xs, plan.splits, stack.get(experts))
    else:
        outs = [experts[e](chunk) for e, chunk in enumerate(xs.split(plan.splits)) if chunk.shape[0]]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (P, T, D)
    if scale:
        out = out * w.reshape(-1).index_select(0, plan.pair).to(out.dtype).view(-1, 1, 1)
    if plan.rows.shape[0] == B:  # one expert per row: a permutation
        return torch.empty_like(out).index_copy_(0, plan.rows, out)
    return torch.zeros(B, T, D, dtype=out.dtype, device=out.device).index_add_(0, plan.rows, out)


def dispatch_ref(x: Tensor, routing: Routing, experts: Sequence[nn.Module]) -> Tensor:
    """Plain loop twin of :func:`dispatch`: each sequence alone through each of its experts."""
    rows = []
    for b in range(x.shape[0]):
        slots = sorted((int(e), k) for k, e in enumerate(routing.ids[b].tolist()) if e >= 0)
        acc = None
        for e, k in slots:
            out = experts[e](x[b : b + 1]) * routing.weights[b, k]
            acc = out if acc is None else acc + out
        rows.append(acc)
    return torch.cat(rows)


# --------------------------------------------------------------------------------- layer
class SequenceMoE(nn.Module):
    """Experts by name, applied per sequence according to a :class:`Routing`.

    ``experts`` maps names to built modules (``(…, D) -> (…, D)``); ``gate`` is optional: a DOE
    model owns one gate for all its layers and passes the routing in.
    """

    def __init__(self, experts: Mapping[str, nn.Module], gate: SequenceGate | None = None) -> None:
        super().__init__()
        if not experts:
            raise ConfigError("SequenceMoE: needs at least one expert")
        self.experts = nn.ModuleDict({check_name(n): m for n, m in experts.items()})
        self.gate = gate
        self._stack = StackedSwiGLU()
        if gate is not None and set(gate.names) != set(self.experts):
            raise ConfigError(f"SequenceMoE: gate names {list(gate.names)} != expert names {list(self.experts)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.experts.keys())

    def ordered(self, names: Sequence[str]) -> list[nn.Module]:
        try:
            return [self.experts[n] for n in names]
        except KeyError as e:
            raise ConfigError(f"SequenceMoE: routing names {list(names)} include {e} not in this layer's experts "
                              f"{list(self.names)}") from None

    def route(self, x: Tensor, prompt_mask: Tensor | None = None, **kw) -> Routing:
        if self.gate is None:
            raise ConfigError("SequenceMoE.route: this layer has no gate; pass a Routing from the model's gate")
        return self.gate(pool_prompt(x, prompt_mask), **kw)

    def train(self, mode: bool = True) -> "SequenceMoE":
        if mode:
            self._stack.clear()  # the stacked inference copy is rebuilt on the next no-grad mixed call
        return super().train(mode)

    def init_state(self, batch_size: int, device=None, dtype=None) -> None:
        """No routing before the first (prefill) call; the routing then is this layer's decoding state."""
        return None

    def forward(self, x: Tensor, routing: Routing | None = None, *,
                prompt_mask: Tensor | None = None) -> tuple[Tensor, Routing]:
        """``x`` (B, T, D) -> ``(y, routing)``: the sequence-module protocol, the state being the routing.

        Without a routing the layer's own gate routes from ``x`` pooled over ``prompt_mask``.
        """
        if x.dim() != 3:
            raise ValueError(f"SequenceMoE: expected x of shape (B, T, D), got {tuple(x.shape)}")
        if routing is None:
            routing = self.route(x, prompt_mask)
        if routing.batch_size != x.shape[0]:
            raise ValueError(f"SequenceMoE: routing for {routing.batch_size} sequences, input has {x.shape[0]}")
        return dispatch(x, routing, self.ordered(routing.names), self._stack), routing

    def add_expert(self, name: str, module: nn.Module, **gate_kw) -> None:
        """Add an expert (and, for a layer with its own gate, its gate: see :meth:`SequenceGate.add_expert`)."""
        check_name(name)
        if name in self.experts:
            raise ConfigError(f"SequenceMoE: expert {name!r} already exists (have {list(self.names)})")
        if self.gate is not None:
            self.gate.add_expert(name, **gate_kw)
        self.experts[name] = module

    def remove_expert(self, name: str) -> nn.Module:
        if name not in self.experts:
            raise ConfigError(f"SequenceMoE: no expert {name!r} (have {list(self.names)})")
        if len(self.experts) == 1:
            raise ConfigError(f"SequenceMoE: cannot remove {name!r}, the last expert")
        module = self.experts[name]
        del self.experts[name]
        if self.gate is not None:
            self.gate.remove_expert(name)
        return module
