"""Modality experts on a DOE model: text untouched (bit-identical), guarded routing, exact splice, mixed batches,
frozen training, save/load, and batched media generation equal to one question at a time."""

from __future__ import annotations

import pytest
import torch

from taskmoe.doe import DOEConfig, build_doe
from taskmoe.doe.modality import (AudioEncoder, AudioEncoderConfig, ImageEncoder, ImageEncoderConfig, MediaInput,
                                  MultimodalLM, load_multimodal, modality_force, save_multimodal)
from taskmoe.doe.modality.model import HeadAdapter
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.inference.media import Bound, MediaQuestion, generate_media
from taskmoe.models import LMConfig

V, D = 300, 32


def tiny_base():
    torch.manual_seed(0)
    m = build_doe(DOEConfig(lm=LMConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2), experts=["a", "b", "c"]))
    for n in m.gate.names:  # spread the gates so text rows pick different experts
        m.gate.bias[n].data.fill_(0.3)
    return m.eval()


def add_both(mm: MultimodalLM) -> None:
    mm.add_modality("image", ImageEncoder(ImageEncoderConfig(image_size=8, channels=8), D), init_from="a", head_rank=4)
    mm.add_modality("audio", AudioEncoder(AudioEncoderConfig(clip_seconds=0.25, channels=8, n_mels=16), D), head_rank=4)


def scramble(mm: MultimodalLM, bias: float) -> None:
    """Random modality weights (as if trained) and gate biases that make the modality gates alone accept everything."""
    g = torch.Generator().manual_seed(1)
    for m in mm.modalities:
        for p in mm.modality_parameters(m):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
        mm.base.gate.bias[mm.experts[m]].data.fill_(bias)
    mm.eval()


def image_batch(B: int = 2, T: int = 9, start: int = 2, n: int = 5) -> tuple[torch.Tensor, MediaInput]:
    ids = torch.randint(3, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, start : start + n] = True
    return ids, MediaInput.full("image", torch.rand(B, 8, 8), mask)


@pytest.fixture
def mm() -> MultimodalLM:
    model = MultimodalLM(tiny_base())
    add_both(model)
    return model.eval()


def test_text_logits_and_generation_bit_identical_after_adding_both_modalities() -> None:
    base = tiny_base()
    ids = torch.randint(3, V, (6, 11))
    ref = base(ids)
    ref_gen = generate(base, ids[:, :5].tolist(), GenerationConfig(max_new_tokens=6, temperature=0.0))
    assert len(set(ref.routing.expert_names())) > 1  # several text experts in play
    mm = MultimodalLM(base)
    add_both(mm)
    scramble(mm, bias=10.0)  # trained-looking modality weights; their gates alone would accept every text row
    with torch.no_grad():
        out = mm(ids)
    assert torch.equal(out.logits, ref.logits)
    assert out.routing.expert_names() == ref.routing.expert_names()
    assert generate(mm, ids[:, :5].tolist(), GenerationConfig(max_new_tokens=6, temperature=0.0)) == ref_gen
    gate_alone = out.routing.scores[:, list(out.routing.names).index("image")]
    assert bool((gate_alone > 0.5).all())  # the guard, not the gate, keeps text away from the image expert


def test_guarded_routing(mm: MultimodalLM) -> None:
    names = mm.base.gate.names
    ids, img = image_batch(2)
    text = torch.randint(3, V, (1, 9))
    force = modality_force(names, mm.experts, 3, [MediaInput("image", img.values, torch.cat([img.mask, torch.zeros(1, 9, dtype=torch.bool)]), torch.tensor([0, 1]))])
    assert force.tolist() == [[0, 0, 0, -1, 0], [0, 0, 0, -1, 0], [-1, -1, -1, 0, 0]]
    scramble(mm, bias=10.0)
    assert mm(ids, media=[img]).routing.expert_names() == [("image",), ("image",)]
    scramble(mm, bias=-10.0)  # the image gate rejects: the default (a text expert) serves, and says so
    r = mm(ids, media=[img]).routing
    assert bool(r.fallback.all()) and all(e[0] in ("a", "b", "c") for e in r.expert_names())
    with pytest.raises(ConfigError, match="no 'video' expert"):
        modality_force(names, mm.experts, 1, [MediaInput("video", img.values[:1], img.mask[:1], torch.tensor([0]))])


def test_splice_puts_encoder_outputs_at_the_placeholders(mm: MultimodalLM) -> None:
    ids, img = image_batch(2)
    seen = {}
    h = mm.base.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        mm(ids, media=[img])
    h.remove()
    x = seen["x"]
    enc = mm.encoders["image"](img.values)  # (2, 5, D): 2 x 2 patches + the summary
    assert torch.equal(x[img.mask].view(2, 5, D), enc)
    assert torch.equal(x[~img.mask], mm.base.embedding(ids)[~img.mask])
    assert not mm.base.embedding._forward_hooks  # the hook lives only for the call


def test_mixed_batch_equals_each_row_alone(mm: MultimodalLM) -> None:
    scramble(mm, bias=10.0)
    T = 9
    ids = torch.randint(3, V, (3, T))
    im = torch.zeros(3, T, dtype=torch.bool)
    im[1, 2:7] = True
    au = torch.zeros(3, T, dtype=torch.bool)
    au[2, 3:8] = True
    imgs, wav = torch.rand(1, 8, 8), torch.randn(1, 2000) * 0.1
    media = [MediaInput("image", imgs, im, torch.tensor([1])), MediaInput("audio", wav, au, torch.tensor([2]))]
    with torch.no_grad():
        out = mm(ids, media=media)
        alone = [mm(ids[:1]), mm(ids[1:2], media=[MediaInput.full("image", imgs, im[1:2])]),
                 mm(ids[2:], media=[MediaInput.full("audio", wav, au[2:])])]
    assert out.routing.expert_names() == [alone[0].routing.expert_names()[0], ("image",), ("audio",)]
    for b in range(3):
        assert torch.allclose(out.logits[b], alone[b].logits[0], atol=1e-5), b


def test_training_moves_only_the_modality_and_keeps_text_exact(mm: MultimodalLM) -> None:
    text = torch.randint(3, V, (4, 10))
    with torch.no_grad():
        before_text = mm(text).logits
    frozen = {k: v.clone() for k, v in mm.state_dict().items()}
    trainable = mm.freeze_except("image")
    own = {id(p) for p in trainable}
    assert {n for n, p in mm.named_parameters() if id(p) in own} == {
        n for n, _ in mm.named_parameters() if n.startswith(("encoders.image.", "heads.image.")) or ".experts.image." in n
        or n in ("base.gate.weight.image", "base.gate.bias.image")}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    mm.train()
    ids, img = image_batch(4)
    for _ in range(2):
        out = mm(ids, media=[img], teacher=True)
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1], torch.full((4,), 7)) + out.routing.scores[:, 3].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mm.eval()
    moved = {k for k, v in mm.state_dict().items() if not torch.equal(v, frozen[k])}
    assert moved and all(k.startswith(("encoders.image.", "heads.image.")) or ".experts.image." in k
                         or k.endswith((".image",)) for k in moved), moved
    with torch.no_grad():
        assert torch.equal(mm(text).logits, before_text)


def test_save_load_round_trip(tmp_path, mm: MultimodalLM) -> None:
    scramble(mm, bias=10.0)
    ids, img = image_batch(2)
    with torch.no_grad():
        ref = mm(ids, media=[img]).logits
    save_multimodal(mm, tmp_path / "mm")
    back = load_multimodal(tmp_path / "mm")
    assert back.experts == {"image": "image", "audio": "audio"} and back.base.gate.late == ["image", "audio"]
    with torch.no_grad():
        assert torch.equal(back(ids, media=[img]).logits, ref)
    from taskmoe.doe.model import load_doe

    with pytest.raises(CheckpointError, match="holds a 'multimodal', expected 'doe'"):
        load_doe(tmp_path / "mm")


def test_a_folder_saved_before_summary_from_loads_as_the_mean_summary(tmp_path) -> None:
    """Encoder configs written before ``summary_from`` existed have no such key: they meant the mean summary."""
    import json

    mm = MultimodalLM(tiny_base())
    mm.add_modality("image", ImageEncoder(ImageEncoderConfig(image_size=8, channels=8, summary_from="mean"), D),
                    head_rank=4)
    scramble(mm, bias=10.0)
    ids, img = image_batch(2)
    with torch.no_grad():
        ref = mm(ids, media=[img]).logits
    folder = save_multimodal(mm, tmp_path / "old")
    cfg_file = folder / "config.json"
    raw = json.loads(cfg_file.read_text())
    del raw["config"]["modalities"]["image"]["encoder"]["summary_from"]
    cfg_file.write_text(json.dumps(raw))
    back = load_multimodal(folder)
    assert back.encoders["image"].cfg.summary_from == "mean"
    with torch.no_grad():
        assert torch.equal(back(ids, media=[img]).logits, ref)


def test_head_adapter_init_scale() -> None:
    """``B`` ~ N(0, init^2 / r) and ``A`` ~ N(0, 1 / D); ``head_init`` of add_modality reaches it."""
    torch.manual_seed(0)
    for init in (0.1, 2.0):
        h = HeadAdapter(64, 4096, 16, init)
        assert abs(float(h.B.weight.detach().std()) / (init / 4) - 1) < 0.03 and abs(float(h.A.weight.detach().std()) * 8 - 1) < 0.05
        assert torch.equal(h.B.bias, torch.zeros(4096))
    mm = MultimodalLM(tiny_base())
    mm.add_modality("image", ImageEncoder(ImageEncoderConfig(image_size=8, channels=8), D), head_rank=8, head_init=0.5)
    assert abs(float(mm.heads["image"].B.weight.detach().std()) / (0.5 / 8 ** 0.5) - 1) < 0.1


def test_generate_media_batched_equals_one_at_a_time(mm: MultimodalLM) -> None:
    scramble(mm, bias=10.0)
    tok = Tokenizer.train(["What digit is this? seven spoken audio 0123456789 " * 3] * 10, 300, show_progress=False)
    g = torch.Generator().manual_seed(0)
    qs = [MediaQuestion("What digit is this?", "image", torch.rand(8, 8, generator=g).numpy()),
          MediaQuestion("What digit is spoken? <audio>", "audio", (torch.randn(1500, generator=g).numpy() * 0.1, 4000)),
          MediaQuestion("What digit is this?", "image", torch.rand(8, 8, generator=g).numpy()),
          MediaQuestion("plain text question")]
    cfg = GenerationConfig(max_new_tokens=5, temperature=0.0)
    together = generate_media(mm, tok, qs, cfg)
    alone = [generate_media(mm, tok, [q], cfg)[0] for q in qs]
    assert [a.tokens for a in together] == [a.tokens for a in alone]
    assert [a.experts[0] for a in together][:3] == ["image", "audio", "image"]
    text_ids = [tok.bos_id, *tok.encode("plain text question", allow_special=False)]
    assert together[3].tokens == generate(tiny_base(), [text_ids], cfg)[0] and together[3].modality is None  # the text model's


def test_bound_refuses_a_prefill_it_was_not_built_for(mm: MultimodalLM) -> None:
    ids, img = image_batch(2)
    with pytest.raises(RuntimeError, match="prefill of shape"):
        Bound(mm, [img])(ids[:1, :5])
