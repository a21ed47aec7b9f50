"""DOE (fused): a transformer whose MLPs are experts routed per *sequence*, each expert owning its gate.

- :mod:`taskmoe.doe.routing` — the routing rule (threshold / capacity-constrained assignment, default
  expert, combine weights), the :class:`Routing` record and its cached dispatch plan, the gate loss.
- :mod:`taskmoe.doe.seq_moe` — :class:`SequenceGate` and :class:`SequenceMoE` (grouped dispatch).
- :mod:`taskmoe.doe.model` — :class:`DOETransformer`, :class:`DOEConfig`, build / save / load.
- :mod:`taskmoe.doe.upcycle` — a pretrained backbone's MLPs as experts (``base`` + copy / LoRA experts),
  centroid gates, folders that reference the backbone (``taskmoe doe upcycle``).
- :mod:`taskmoe.doe.report` — which expert takes which domain (table, NMI, heatmap).
"""

from taskmoe.doe.model import DOEConfig, DOEOutput, DOETransformer, build_doe, load_doe, save_doe
from taskmoe.doe.routing import Routing, balanced_assignment, capacity_for, decide, gate_loss, pool_prompt
from taskmoe.doe.seq_moe import SequenceGate, SequenceMoE, dispatch, dispatch_ref

__all__ = [
    "DOEConfig", "DOEOutput", "DOETransformer", "build_doe", "load_doe", "save_doe", "Routing", "capacity_for",
    "decide", "balanced_assignment", "gate_loss", "pool_prompt", "SequenceGate", "SequenceMoE", "dispatch", "dispatch_ref",
]
