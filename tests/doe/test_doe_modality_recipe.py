"""train modality end to end on the bundled 8x8 digits and synthesized tones, then generate --image / --audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskmoe.data.media import encode_png, encode_wav
from taskmoe.data.media_tasks import digit_images, synth_digit_audio
from taskmoe.errors import RequestError
from taskmoe.inference.commands import generate_text
from taskmoe.io import load_tensors
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.doe import DOEConfig, build_doe, save_doe
from taskmoe.models import LMConfig
from taskmoe.training.recipes.modality import train_modality

SMALL = dict(channels=16, batch_size=32, progress=False)


def tiny_text_model(folder) -> None:
    """A small DOE model and tokenizer saved like `taskmoe train doe` does (untrained: the contracts do not need it)."""
    texts = ["What digit is this? Describe the image. What digit is spoken? Transcribe the audio. "
             "a handwritten zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9"] * 20
    tok = Tokenizer.train(texts, 400, show_progress=False)
    cfg = DOEConfig(lm=LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2), experts=["e0", "e1"])
    save_doe(build_doe(cfg), folder, extra_files={"tokenizer.json": lambda p: p.write_text(tok.to_str())})


def test_train_image_then_audio_and_generate(tmp_path) -> None:
    torch.set_num_threads(1)
    base = tmp_path / "doe"
    tiny_text_model(base)
    rep = train_modality(kind="image", base=base, out=tmp_path / "mm", steps=40, lr=3e-3, max_test=100, **SMALL)
    q = rep["test"]["What digit is this? <image>"]
    assert rep["final_loss"] < 0.5 * rep["first_loss"]  # it learns (accuracy is the benchmark's business)
    assert q["n"] == 100 and q["taken_by_expert"] == 1.0 and rep["text_routing"]["text_taken"] == 0.0
    before, after = load_tensors(base / "model.safetensors"), load_tensors(tmp_path / "mm" / "model.safetensors")
    for k, v in before.items():  # every tensor of the text model is unchanged
        assert torch.equal(after[f"base.{k}"], v), k

    rep2 = train_modality(kind="audio", base=tmp_path / "mm", out=tmp_path / "mm2", steps=10, lr=3e-3, **SMALL)
    assert rep2["experts"] == ["e0", "e1", "image", "audio"] and rep2["test"]["What digit is spoken? <audio>"]["n"] == 100
    img_after = load_tensors(tmp_path / "mm2" / "model.safetensors")
    for k, v in after.items():  # adding audio moved nothing of the image model either
        assert torch.equal(img_after[k], v), k

    x, y = digit_images(None, "test")
    png = tmp_path / "digit.png"
    png.write_bytes(encode_png(x[0].numpy()))
    res = generate_text(tmp_path / "mm2", "What digit is this?", image=png)
    assert res["experts"] == "image" and res["modality"] == "image" and res["answer"].strip() != ""
    wav = tmp_path / "tone.wav"
    wav.write_bytes(encode_wav(synth_digit_audio(4, 1, 8000, 1.0, seed=3)[0], 8000))
    assert generate_text(tmp_path / "mm2", "What digit is spoken?", audio=wav)["experts"] == "audio"
    text = generate_text(tmp_path / "mm2", "hello there", max_new_tokens=4)
    assert text["modality"] == "text" and text["experts"] in ("e0", "e1")
    with pytest.raises(RequestError, match="not both"):
        generate_text(tmp_path / "mm2", "x", image=png, audio=wav)
    with pytest.raises(RequestError, match="no audio expert"):
        generate_text(tmp_path / "mm", "x", audio=wav)
