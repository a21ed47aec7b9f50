"""Tiny random Llama-family checkpoints in Hugging Face layout, built in code (no weights downloaded).

:func:`write_hf_backbone` saves a ``transformers`` model (safetensors) plus a small byte-level BPE
``tokenizer.json`` and a ``tokenizer_config.json`` with a ChatML template (SmolLM2's), so the folder
is what ``taskmoe backbone import`` reads from a local Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = ["hello world, this is a tiny tokenizer for tests.", "the quick brown fox jumps over the lazy dog",
         "def parse_args(argv): return argv", "A software license is a contract."] * 20


def hf_config(arch: str = "llama", tie: bool = True, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1,
                eos_token_id=2, rms_norm_eps=1e-5)
    base.update(kw)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    if arch == "mistral":
        base.setdefault("sliding_window", None)
    return cls(**base)


def hf_model(arch: str = "llama", tie: bool = True, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, tie, **kw), dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a mapping mistake shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def write_tokenizer(folder: Path) -> None:
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256}))


def write_hf_backbone(folder: Path, arch: str = "llama", tie: bool = True, **kw):
    """Save a tiny random HF model + tokenizer to ``folder``; return the transformers model."""
    model = hf_model(arch, tie, **kw)
    model.save_pretrained(str(folder))
    write_tokenizer(folder)
    return model


def backbone_experts_run(root: Path, run: Path):
    """A backbone system on a tiny random Llama in ``root / "backbone"``: a router on its hidden states and two
    LoRA experts trained 3 steps each into ``run``; returns (the transformers model, the experts' rows)."""
    from taskmoe.training.recipes.experts import train_experts
    from taskmoe.training.recipes.router import route_fit

    hf = write_hf_backbone(root / "backbone")
    route_fit(out=run / "router", encoder="backbone", backbone=root / "backbone", layer=1, n_categories="2",
              max_docs_per_domain=6, progress=False)
    rows = train_experts(run, backbone=root / "backbone", steps=3, batch_size=2, seq_len=32, max_docs_per_domain=6,
                         rank=4, progress=False)
    return hf, rows
