"""taskmoe.experts: the IMoE experts and what they need around them.

- ``expert_lm.py``: :func:`build_expert` (an ``expert_lm`` around the router's shared embedding,
  frozen by default), :func:`save_expert` / :func:`load_expert` (folders without the shared
  table), :func:`open_store`.
- ``assign.py``: :func:`assign` / :func:`route_documents`, which training documents each expert gets.
- ``semantic_loss.py``: the retrieval index, retrieval windows and the semantic-similarity loss.
- ``ensemble.py``: the confidence-weighted mixture (:func:`mixture_logprobs`,
  :func:`routing_weights`, :class:`RoutedMixture`).
- ``store.py``: :class:`ExpertStore`, lazy LRU loading under a budget.
- ``pruning.py``: :class:`ContributionTracker` and the loop hook :class:`PruningCallback`.

Training recipes live in :mod:`taskmoe.training.recipes.experts`; perplexity evaluation in
:mod:`taskmoe.eval.perplexity`.
"""

from taskmoe.experts.assign import Assignment, assign, route_documents
from taskmoe.experts.ensemble import RoutedMixture, mixture_logprobs, routing_weights
from taskmoe.experts.expert_lm import build_expert, expert_config, expert_loader, load_expert, open_store, save_expert
from taskmoe.experts.pruning import ContributionTracker, PruneEvent, PruningCallback, PruningConfig
from taskmoe.experts.semantic_loss import (
    RetrievalIndex,
    RetrievalWindows,
    combined_loss,
    expected_embedding,
    semantic_similarity_loss,
)
from taskmoe.experts.store import ExpertStore, StoreStats

__all__ = [
    "Assignment", "assign", "route_documents", "RoutedMixture", "mixture_logprobs", "routing_weights", "build_expert",
    "expert_config", "expert_loader", "load_expert", "open_store", "save_expert", "ContributionTracker", "PruneEvent",
    "PruningCallback", "PruningConfig", "RetrievalIndex", "RetrievalWindows", "combined_loss", "expected_embedding",
    "semantic_similarity_loss", "ExpertStore", "StoreStats",
]
