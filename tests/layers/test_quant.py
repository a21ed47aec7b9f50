"""4-bit backbones: Int4Linear under LoRA, quantize_lm on a tiny random Llama, and the weights="int4" entry points."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "models" / "backbones"))
from backbone_helpers import backbone_experts_run, hf_config  # noqa: E402

from taskmoe.errors import ConfigError  # noqa: E402
from taskmoe.layers.lora import inject, set_adapter  # noqa: E402
from taskmoe.layers.multi_lora import use_row_adapters  # noqa: E402
from taskmoe.layers.quant import Int4Linear, Int8Linear, quantize_linears  # noqa: E402
from taskmoe.models.backbones.config import LlamaConfig  # noqa: E402
from taskmoe.models.backbones.llama import llama_lm  # noqa: E402
from taskmoe.models.quantize import BF16Head, quantize_lm  # noqa: E402

pytest.importorskip("transformers")


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return llama_lm(LlamaConfig.from_hf(hf_config().to_dict())).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_quantized_model_stays_close_and_decodes_like_its_full_forward() -> None:
    model = tiny()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        q = copy.deepcopy(model)
        names = quantize_lm(q)
        assert "lm_head" in names and isinstance(q.lm_head, Int8Linear)
        assert isinstance(q.blocks[0].mixer.q_proj, Int4Linear) and isinstance(q.blocks[1].mlp.down_proj, Int4Linear)
        assert q.embedding.weight.dtype == torch.float32  # the input embedding is untouched
        full = q(ids).logits
        assert rel_err(full, ref) < 0.1  # random float weights forced to 4 bits: a few percent
        state = q.init_state(2)
        out = q(ids[:, :7], state)
        steps = [out.logits]
        state = out.state
        for t in range(7, 12):
            out = q(ids[:, t:t + 1], state)
            steps.append(out.logits)
            state = out.state
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=2e-2, atol=2e-2)
    assert not any(p.requires_grad for p in q.parameters())


def test_a_model_already_on_the_4bit_grid_loses_only_rounding() -> None:
    """A backbone that shipped as GGUF Q4_1 comes back onto its own grid: only bf16 rounding remains."""
    from taskmoe.ops.int4 import dequantize_int4, quantize_int4

    model = tiny()
    with torch.no_grad():
        for blk in model.blocks:
            for lin in [m for m in blk.modules() if isinstance(m, nn.Linear)]:
                lin.weight.copy_(dequantize_int4(*quantize_int4(lin.weight, 32)))
        ids = torch.randint(0, 300, (2, 12))
        ref = model(ids).logits
        quantize_lm(model, head="fp32")
        assert rel_err(model(ids).logits, ref) < 0.02


def test_head_formats_and_errors() -> None:
    for head, kind in (("int4", Int4Linear), ("bf16", BF16Head), ("fp32", type(None))):
        q = tiny()
        quantize_lm(q, head=head)
        assert isinstance(q.lm_head, kind)
    with pytest.raises(ConfigError, match="head format"):
        quantize_lm(tiny(), head="int2")
    with pytest.raises(ConfigError, match="CausalLM-like"):
        quantize_lm(nn.Linear(64, 64))


def test_tied_and_indivisible_layers_stay_float() -> None:
    m = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 64), nn.Linear(64, 64))
    shared = nn.Linear(64, 64)
    holder = nn.ModuleDict({"a": shared, "b": nn.Linear(64, 64)})
    holder["b"].weight = shared.weight  # tied: neither may be quantized
    assert quantize_linears(holder) == []
    assert quantize_linears(m) == ["0", "2"]  # 8 inputs: no 32-group, stays float
    assert isinstance(m[1], nn.Linear) and not m[0].kernel  # 8 outputs: the dequantizing fallback
    x = torch.randn(2, 64)
    assert m(x).shape == (2, 64)


def test_lora_on_a_4bit_base_mixed_rows_equal_each_row_alone() -> None:
    model = tiny()
    inject(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8.0, adapter_name="legal")
    inject(model, ["q_proj", "up_proj"], rank=2, alpha=4.0, adapter_name="code")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    quantize_lm(model)
    layer = model.blocks[0].mixer.q_proj
    assert layer.quantized and layer.weight is None and isinstance(layer.unwrap_base(), Int4Linear)
    with pytest.raises(ConfigError, match="4-bit base"):
        layer.merge("legal")
    layer.add_adapter("late", 2, 2.0)  # an expert loaded lazily after quantization gets float32 weights
    assert layer.lora_A["late"].dtype == torch.float32
    ids = torch.randint(0, 300, (3, 9))
    side = ["code", None, "legal"]
    with torch.no_grad():
        with use_row_adapters(model, side):
            mixed = model(ids).logits
        alone = []
        for i, name in enumerate(side):
            set_adapter(model, name)
            alone.append(model(ids[i:i + 1]).logits)
        set_adapter(model, None)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-3, atol=1e-3)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3  # the adapters do change the rows


def test_backbone_system_loads_in_int4_and_answers(tmp_path: Path) -> None:
    from taskmoe.inference.loader import load_system
    from taskmoe.serving.backends import load_backend

    backbone_experts_run(tmp_path, tmp_path / "run")
    system = load_system(tmp_path / "run", weights="int4")
    assert isinstance(system.backbone.blocks[0].mlp.gate_proj, Int4Linear)
    ans = system.generate("def parse_args(argv):", trace=True, max_new_tokens=4)
    assert ans.trace is not None and ans.trace.experts and ans.trace.experts[0].status == "loaded"
    backend = load_backend(tmp_path / "backbone", weights="int4")
    model = next(iter(backend.models.values()))
    assert isinstance(model.blocks[0].mixer.k_proj, Int4Linear)
    with pytest.raises(ConfigError, match="weights must be one of"):
        load_system(tmp_path / "run", weights="int3")


@pytest.mark.slow
def test_real_smollm2_projections_are_on_a_4bit_grid_and_int4_answers(tmp_path: Path) -> None:
    """SmolLM2 ships as GGUF Q4_1: every projection comes back exactly from its 4-bit codes."""
    from taskmoe.errors import CheckpointError
    from taskmoe.inference.generate import GenerationConfig, generate
    from taskmoe.models.backbones import import_backbone, load_backbone
    from taskmoe.models.backbones.load import default_source
    from taskmoe.ops.int4 import dequantize_int4, quantize_int4

    try:
        source = default_source()
    except CheckpointError as e:
        pytest.skip(f"real backbone not installed: {e}")
    out = tmp_path / "smollm2"
    import_backbone(source, out=out)
    model, tok = load_backbone(out)
    for name, p in model.blocks.named_parameters():
        if p.dim() == 2:
            assert torch.equal(dequantize_int4(*quantize_int4(p, 32)), p), name
    q, _ = load_backbone(out, weights="int4")
    ids = tok.encode_chat([{"role": "user", "content": "What is a software license?"}])
    answer = generate(q, [ids], GenerationConfig(max_new_tokens=24, temperature=0.0, stop_tokens=[tok.eos_id]))[0]
    assert "license" in tok.decode(answer).lower()


def test_prefill_copy_serves_long_inputs_and_agrees_with_the_kernel() -> None:
    lin = nn.Linear(64, 48)
    dense = Int4Linear.from_linear(lin, 32, dense=True, dense_above=32)
    plain = Int4Linear.from_linear(lin, 32)
    assert dense.dense is not None and dense.dense.dtype == torch.bfloat16 and plain.dense is None
    x = torch.randn(4, 20, 64)  # 80 rows: the bfloat16 copy
    torch.testing.assert_close(dense(x), plain(x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dense(x[:1, :3]), plain(x[:1, :3]))  # 3 rows: the same int4 kernel
    q = tiny()
    quantize_lm(q, prefill="int4")
    assert q.blocks[0].mlp.up_proj.dense is None
    with pytest.raises(ConfigError, match="prefill format"):
        quantize_lm(tiny(), prefill="fp8")
