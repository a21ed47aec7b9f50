"""taskmoe.router: which experts see an input.

Unsupervised category discovery over learned (or tf-idf / pretrained) sequence vectors, a
temperature-calibrated classifier, a complexity scorer, and the IMoE policy (complexity-adaptive
threshold, multi-expert selection, fallback, cross-talk trigger). Entry points:

- :class:`Router` (``router.py``): ``route(ids) -> RoutingDecision``, ``add_category``, save/load
- :func:`fit_router`, :class:`RouterConfig` (``fit.py``)
- :class:`RoutingDecision`, :func:`decide`, :func:`threshold` (``policy.py``)
- encoders (``encoders/``: one file per encoder), clustering (``clustering.py``), classifier (``classifier.py``),
  complexity (``complexity.py``)
"""

from taskmoe.router.classifier import ClassifierConfig, expected_calibration_error
from taskmoe.router.clustering import ClusteringConfig
from taskmoe.router.complexity import ComplexityConfig, ComplexityScorer
from taskmoe.router.encoders import (
    Encoder,
    LearnedEncoder,
    LearnedEncoderConfig,
    NotFittedError,
    PretrainedEncoder,
    PretrainedEncoderConfig,
    TfidfEncoder,
    TfidfEncoderConfig,
    build_encoder,
)
from taskmoe.router.fit import RouterConfig, fit_router
from taskmoe.router.policy import PolicyConfig, RoutingDecision, crosstalk_pair, decide, decide_batch, select, threshold
from taskmoe.router.persist import load_shared_embedding
from taskmoe.router.router import Router

__all__ = [
    "ClassifierConfig",
    "ClusteringConfig",
    "ComplexityConfig",
    "ComplexityScorer",
    "Encoder",
    "LearnedEncoder",
    "LearnedEncoderConfig",
    "NotFittedError",
    "PolicyConfig",
    "PretrainedEncoder",
    "PretrainedEncoderConfig",
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "TfidfEncoder",
    "TfidfEncoderConfig",
    "build_encoder",
    "crosstalk_pair",
    "decide",
    "decide_batch",
    "expected_calibration_error",
    "fit_router",
    "load_shared_embedding",
    "select",
    "threshold",
]
