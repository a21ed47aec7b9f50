"""The public API other packages build on (router, experts, summarizer, DOE, inference) is pinned here.

Changing one of these signatures breaks other engineers' code: update this test only together
with every caller.
"""

from __future__ import annotations

import inspect

import taskmoe.layers as tlayers
import taskmoe.models as tmodels
import taskmoe.ops as tops
from taskmoe.inference import generate as gen
from taskmoe.inference import sampling

SIGNATURES = {
    tmodels.expert_lm: "(cfg: 'ExpertLMConfig | LMConfig', embedding: 'nn.Embedding | None' = None) -> 'CausalLM'",
    tmodels.summarizer_lm: "(cfg: 'SummarizerLMConfig | LMConfig', embedding: 'nn.Embedding | None' = None) -> 'CausalLM'",
    tmodels.transformer_lm: "(cfg: 'TransformerLMConfig | LMConfig', embedding: 'nn.Embedding | None' = None, *, "
                        "mlp_factory: 'Callable[[int], nn.Module] | None' = None) -> 'CausalLM'",
    tmodels.save_lm: "(model: 'CausalLM', folder: 'str | Path', kind: 'str' = 'lm', *, "
                 "meta: 'Mapping[str, Any] | None' = None, include_embedding: 'bool' = True) -> 'Path'",
    tmodels.load_lm: "(folder: 'str | Path', kind: 'str | tuple[str, ...] | None' = None, *, "
                 "embedding: 'nn.Embedding | None' = None, device: 'str | torch.device' = 'cpu') -> 'CausalLM'",
    tmodels.CausalLM.forward: "(self, input_ids: 'Tensor', state: 'LMState | None' = None, *, "
                          "logits_to_keep: 'int' = 0, lengths: 'Tensor | None' = None) -> 'LMOutput'",
    tmodels.CausalLM.init_state: "(self, batch_size: 'int', device: 'torch.device | str | None' = None, "
                             "dtype: 'torch.dtype | None' = None) -> 'LMState'",
    tlayers.SwiGLU.__init__: "(self, d_model: 'int', d_hidden: 'int') -> 'None'",
    tlayers.Block.__init__: "(self, mixer: 'nn.Module', mlp: 'nn.Module | None' = None, *, d_model: 'int', "
                        "eps: 'float' = 1e-05, dropout: 'float' = 0.0) -> 'None'",
    gen.generate: "(model: 'nn.Module', prompts: 'list[list[int]]', cfg: 'GenerationConfig | None' = None, "
                  "generator: 'torch.Generator | None' = None, side: 'Sequence[Any] | None' = None) "
                  "-> 'list[list[int]]'",
    gen.stream: "(model: 'nn.Module', prompts: 'Sequence[Sequence[int]]', cfg: 'GenerationConfig | None' = None, "
                "generator: 'torch.Generator | None' = None, side: 'Sequence[Any] | None' = None) "
                "-> 'Iterator[tuple[int, int]]'",
    sampling.sample: "(logits: 'Tensor', *, temperature: 'float' = 1.0, top_k: 'int' = 0, top_p: 'float' = 1.0, "
                     "generator: 'torch.Generator | None' = None) -> 'Tensor'",
}


def test_signatures_are_pinned() -> None:
    for fn, want in SIGNATURES.items():
        assert str(inspect.signature(fn)) == want, fn.__qualname__


def test_exports() -> None:
    for name in ("LMState", "Block", "RMSNorm", "SwiGLU", "Attention", "TemporalConv", "LinearAttention", "SSM"):
        assert name in tlayers.__all__ and hasattr(tlayers, name), name
    for name in ("LMConfig", "CausalLM", "LMOutput", "expert_lm", "summarizer_lm", "transformer_lm", "save_lm",
                 "load_lm", "BUILDERS"):
        assert name in tmodels.__all__ and hasattr(tmodels, name), name
    for op in ("causal_conv", "linear_attention", "selective_scan"):
        for suffix in ("", "_step", "_ref"):
            assert callable(getattr(tops, op + suffix))
    assert set(tmodels.BUILDERS) == {"expert_lm", "summarizer_lm", "transformer_lm"}


def test_ops_share_one_calling_convention() -> None:
    """Every op returns (output, final_state) and takes the carried-in state as keyword ``state``."""
    for op in ("causal_conv", "linear_attention", "selective_scan"):
        for suffix in ("", "_step", "_ref"):
            params = inspect.signature(getattr(tops, op + suffix)).parameters
            assert params["state"].kind is inspect.Parameter.KEYWORD_ONLY, op + suffix
