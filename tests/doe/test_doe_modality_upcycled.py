"""Modality experts on an upcycled backbone (a tiny random Llama built in code): text logits bit-identical,
only the modality trains, the backbone's tokenizer gets a spare placeholder id (no embedding resize), the
folder stores no backbone tensor and reloads exactly, and train modality / generate --image run on it."""

from __future__ import annotations

import copy

import pytest
import torch

from taskmoe.data.backbone_tokenizer import BackboneTokenizer
from taskmoe.data.media import encode_png
from taskmoe.data.media_tasks import digit_images, media_placeholder, media_prompt
from taskmoe.doe.modality import (AudioEncoder, AudioEncoderConfig, ImageEncoder, ImageEncoderConfig, MediaInput,
                                  MultimodalLM, load_multimodal, save_multimodal)
from taskmoe.doe.upcycle import BASE, add_backbone_expert, upcycle_config, upcycle_model
from taskmoe.errors import CheckpointError
from taskmoe.inference.commands import generate_text
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.io import load_tensors
from taskmoe.models.backbones import LlamaConfig, llama_lm, load_backbone, read_backbone_config

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def upcycled_with_text_expert(folder):
    """An upcycled tiny Llama with one trained-looking text expert whose gate accepts about half the sequences."""
    torch.manual_seed(0)
    model = upcycle_model(llama_lm(CFG).eval(), upcycle_config(folder, CFG, gate_layer=1, lora_rank=4, lora_alpha=8.0))
    add_backbone_expert(model, "legal", "lora")
    with torch.no_grad():
        for p in model.expert_parameters("legal"):
            p.add_(0.3 * torch.randn_like(p))
        model.gate.bias["legal"].fill_(0.0)
    return model.eval()


def add_both(mm: MultimodalLM) -> None:
    mm.add_modality("image", ImageEncoder(ImageEncoderConfig(image_size=8, channels=8), CFG.hidden_size), head_rank=0)
    mm.add_modality("audio", AudioEncoder(AudioEncoderConfig(clip_seconds=0.25, channels=8, n_mels=16), CFG.hidden_size),
                    head_rank=4, kind="copy")
    g = torch.Generator().manual_seed(1)
    for m in mm.modalities:  # as if trained, with gates that alone would accept every text row
        for p in mm.modality_parameters(m):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
        mm.base.gate.bias[mm.experts[m]].data.fill_(10.0)
    mm.eval()


def image_batch(B: int = 2, T: int = 9) -> tuple[torch.Tensor, MediaInput]:
    ids = torch.randint(3, CFG.vocab_size, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 2:7] = True  # 2 x 2 patches + the summary
    return ids, MediaInput.full("image", torch.rand(B, 8, 8), mask)


def test_text_logits_and_generation_bit_identical_on_the_upcycled_backbone(tmp_path) -> None:
    base = upcycled_with_text_expert(tmp_path / "bb")
    ids = torch.randint(0, CFG.vocab_size, (6, 11))
    with torch.no_grad():
        ref = base(ids)
    ref_gen = generate(base, ids[:, :5].tolist(), GenerationConfig(max_new_tokens=6, temperature=0.0))
    assert {e for r in ref.routing.expert_names() for e in r} == {BASE, "legal"}  # both text experts in play
    mm = MultimodalLM(copy.deepcopy(base))
    add_both(mm)
    assert mm.upcycled and mm.base.doe_config.backbone.kinds == {"legal": "lora", "image": "lora", "audio": "copy"}
    with torch.no_grad():
        out = mm(ids)
    assert torch.equal(out.logits, ref.logits)
    assert out.routing.expert_names() == ref.routing.expert_names()
    assert generate(mm, ids[:, :5].tolist(), GenerationConfig(max_new_tokens=6, temperature=0.0)) == ref_gen
    assert mm.vocab_size == CFG.vocab_size == mm.base.embedding.num_embeddings  # no embedding row added
    ids, img = image_batch()
    with torch.no_grad():
        r = mm(ids, media=[img]).routing
    assert r.expert_names() == [("image",), ("image",)]


def test_only_the_modality_trains_and_the_backbone_stays_bit_identical(tmp_path) -> None:
    mm = MultimodalLM(upcycled_with_text_expert(tmp_path / "bb"))
    add_both(mm)
    frozen = {k: v.clone() for k, v in mm.state_dict().items()}
    trainable = mm.freeze_except("image")
    own = {id(p) for p in trainable}
    names = {n for n, p in mm.named_parameters() if id(p) in own}
    assert names == {n for n, _ in mm.named_parameters() if n.startswith("encoders.image.") or ".experts.image." in n
                     or n in ("base.gate.weight.image", "base.gate.bias.image")}
    assert any("lora_A" in n for n in names) and not any(".experts.base." in n for n in names)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    mm.train()
    ids, img = image_batch(4)
    for _ in range(2):
        out = mm(ids, media=[img], teacher=True)
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1], torch.full((4,), 7))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mm.state_dict()
    moved = {k for k in frozen if not torch.equal(frozen[k], after[k])}
    assert moved and all(k.startswith("encoders.image.") or ".experts.image." in k or k.endswith(".image") for k in moved)


def test_folder_stores_no_backbone_tensor_and_reloads_exactly(tmp_path) -> None:
    from tests.models.backbones.backbone_helpers import write_hf_backbone

    bb = tmp_path / "bb"
    write_hf_backbone(bb, num_hidden_layers=3)
    backbone, tok = load_backbone(bb)
    base = upcycle_model(backbone, upcycle_config(bb, read_backbone_config(bb), gate_layer=1))
    mm = MultimodalLM(base, placeholder_id=media_placeholder(tok))
    mm.add_modality("image", ImageEncoder(ImageEncoderConfig(image_size=8, channels=8), base.d_model), head_rank=4)
    for p in mm.modality_parameters("image"):
        p.data.add_(0.1 * torch.randn_like(p))
    mm.eval()
    save_multimodal(mm, tmp_path / "mm")
    stored = load_tensors(tmp_path / "mm" / "model.safetensors")
    assert not any(k.startswith("base.blocks") and ".experts.image." not in k for k in stored)
    assert "base.embedding.weight" not in stored and "encoders.image.proj.fc1.weight" in stored
    back = load_multimodal(tmp_path / "mm")
    assert back.placeholder_id == mm.placeholder_id
    ids, _ = media_prompt(tok, "What digit is this?", "image", mm.n_positions("image"), mm.placeholder_id)
    x = torch.tensor([ids])
    media = [MediaInput.full("image", torch.rand(1, 8, 8), x == mm.placeholder_id)]
    with torch.no_grad():
        assert torch.equal(back(x, media=media).logits, mm(x, media=media).logits)
        assert torch.equal(back(x).logits, mm(x).logits)
    (bb / "model.safetensors").write_bytes((bb / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="weights changed"):
        load_multimodal(tmp_path / "mm")


def test_placeholder_is_a_spare_special_token_plain_text_never_yields(tmp_path) -> None:
    from tests.models.backbones.backbone_helpers import write_tokenizer

    write_tokenizer(tmp_path)
    tok = BackboneTokenizer.load(tmp_path)
    assert tok.pad_id == tok.eos_id  # ChatML: pad is eos, so pad cannot mark media
    ph = media_placeholder(tok)
    assert ph not in (tok.bos_id, tok.eos_id) and ph == tok.special_ids["<|unk|>"]
    ids, pos = media_prompt(tok, "What digit <|endoftext|> is this?", "image", 3)
    assert [i for i, t in enumerate(ids) if t == ph] == pos == [len(ids) - 3, len(ids) - 2, len(ids) - 1]
    assert ids[:-3] == tok.encode_prompt("What digit <|endoftext|> is this? ")  # the forged special stays plain text


def test_train_modality_on_a_backbone_folder_and_generate_with_an_image(tmp_path) -> None:
    from tests.models.backbones.backbone_helpers import write_hf_backbone
    from taskmoe.training.recipes.modality import train_modality

    torch.set_num_threads(1)
    bb = tmp_path / "bb"
    write_hf_backbone(bb, num_hidden_layers=2)
    rep = train_modality(kind="image", base=bb, out=tmp_path / "mm", steps=20, batch_size=16, channels=8,
                         max_test=40, set=["negatives=64"], progress=False)
    assert rep["experts"] == [BASE, "image"] and rep["final_loss"] < rep["first_loss"]
    assert rep["test"]["What digit is this? <image>"]["taken_by_expert"] == 1.0 and rep["text_routing"]["text_taken"] == 0
    x, _ = digit_images(None, "test")
    png = tmp_path / "digit.png"
    png.write_bytes(encode_png(x[0].numpy()))
    res = generate_text(tmp_path / "mm", "What digit is this?", image=png, max_new_tokens=3)
    assert res["experts"] == "image" and res["modality"] == "image"
    text = generate_text(tmp_path / "mm", "hello world", max_new_tokens=4)
    ref = generate_text(bb, "hello world", max_new_tokens=4, raw=True)  # the backbone's plain completion
    assert text["experts"] == BASE and text["answer"] == ref["answer"].strip()
    _served_answers_an_image_url_part(tmp_path / "mm", png)


def _served_answers_an_image_url_part(folder, png) -> None:
    """The server loads the upcycled multimodal folder with the backbone's tokenizer and routes an image part."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from taskmoe.serving.app import create_app
    from taskmoe.serving.backends import load_backend
    from taskmoe.serving.media import image_url_part

    backend = load_backend(folder, name="mm")
    assert isinstance(backend.tokenizer, BackboneTokenizer)
    with TestClient(create_app(backend)) as client:
        content = [{"type": "text", "text": "What digit is this?"}, image_url_part(png.read_bytes())]
        r = client.post("/v1/chat/completions", json={"model": "mm", "max_tokens": 3, "temperature": 0,
                                                      "messages": [{"role": "user", "content": content}],
                                                      "taskmoe": {"trace": True}})
        assert r.status_code == 200, r.text
        assert r.json()["taskmoe"]["choices"][0]["route"]["experts"] == ["image"]


def test_train_modality_on_a_doe_upcycle_folder_then_extend_with_audio(tmp_path) -> None:
    from tests.models.backbones.backbone_helpers import write_hf_backbone
    from taskmoe.doe.upcycle import doe_upcycle
    from taskmoe.training.recipes.modality import train_modality

    torch.set_num_threads(1)
    bb = tmp_path / "bb"
    write_hf_backbone(bb, num_hidden_layers=2)
    doe_upcycle(backbone=bb, out=tmp_path / "up", experts="legal", kind="lora")
    small = dict(batch_size=8, channels=8, max_test=10, set=["negatives=16"], progress=False)
    rep = train_modality(kind="image", base=tmp_path / "up", out=tmp_path / "mm", steps=3, **small)
    assert rep["experts"] == [BASE, "legal", "image"]
    rep2 = train_modality(kind="audio", base=tmp_path / "mm", out=tmp_path / "mm2", steps=3, expert_kind="copy", **small)
    assert rep2["experts"] == [BASE, "legal", "image", "audio"]
    mm = load_multimodal(tmp_path / "mm2")
    assert mm.base.doe_config.backbone.kinds == {"legal": "lora", "image": "lora", "audio": "copy"}
    assert (tmp_path / "mm2" / "tokenizer_config.json").is_file()  # the backbone's tokenizer travels with it
    before = load_tensors(tmp_path / "mm" / "model.safetensors")
    after = load_tensors(tmp_path / "mm2" / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items())  # adding audio moved nothing of the image model
