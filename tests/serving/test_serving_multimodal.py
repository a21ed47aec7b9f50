"""The server answers OpenAI-style image_url / input_audio content parts with a multimodal DOE model."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from taskmoe.data.media import encode_png, encode_wav
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.doe import DOEConfig, build_doe
from taskmoe.doe.modality import AudioEncoder, AudioEncoderConfig, ImageEncoder, ImageEncoderConfig, MultimodalLM, save_multimodal
from taskmoe.inference.generate import GenerationConfig
from taskmoe.inference.media import MediaQuestion, generate_media
from taskmoe.models import LMConfig
from taskmoe.serving.backends import load_backend
from taskmoe.serving.media import image_url_part, input_audio_part

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import running  # noqa: E402

IMG = np.zeros((8, 8), np.float32)
IMG[2:6, 3:5] = 1.0


@pytest.fixture(scope="module")
def mm_folder(tokenizer: Tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = build_doe(DOEConfig(lm=LMConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2),
                               experts=["a", "b"]))
    mm = MultimodalLM(base)
    mm.add_modality("image", ImageEncoder(ImageEncoderConfig(image_size=8, channels=8), 32), head_rank=4)
    mm.add_modality("audio", AudioEncoder(AudioEncoderConfig(clip_seconds=0.25, channels=8, n_mels=16), 32), head_rank=4)
    for m in mm.modalities:  # as if trained: nonzero head adapters
        torch.nn.init.normal_(mm.heads[m].B.weight, std=0.5)
    folder = tmp_path_factory.mktemp("mm") / "mm-tiny"
    save_multimodal(mm.eval(), folder, tokenizer_json=tokenizer.to_str())
    return folder


@pytest.fixture(scope="module")
def mm_server(mm_folder):
    from taskmoe.serving.app import create_app

    backend = load_backend(mm_folder)
    with running(create_app(backend)) as srv:
        yield srv, backend


def chat(url: str, content, **kw) -> httpx.Response:
    body = {"model": "mm-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 5,
            "temperature": 0, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_image_and_audio_questions_equal_generate_media(mm_server) -> None:
    srv, backend = mm_server
    assert type(backend).__name__ == "MultimodalBackend"
    tok, model = backend.tokenizer, backend.models["mm-tiny"]
    cfg = GenerationConfig(max_new_tokens=5, temperature=0.0, stop_tokens=[tok.eos_id])
    wav = (np.sin(np.arange(2000) / 3) * 0.4).astype(np.float32)
    cases = [([{"type": "text", "text": "What digit is this?"}, image_url_part(encode_png(IMG))],
              MediaQuestion("What digit is this? <image>", "image", np.round(IMG * 255) / 255), "image"),
             ([input_audio_part(encode_wav(wav, 8000)), {"type": "text", "text": "What digit is spoken?"}],
              MediaQuestion("What digit is spoken? <audio>", "audio", (np.rint(wav * 32767) / 32768, 8000)), "audio")]
    for content, question, expert in cases:
        r = chat(srv.url, content, n=2, taskmoe={"trace": True})
        assert r.status_code == 200, r.text
        body = r.json()
        want = generate_media(model, tok, [question], cfg)[0]
        assert [c["message"]["content"] for c in body["choices"]] == [tok.decode(want.tokens, skip_special=True)] * 2
        route = body["taskmoe"]["choices"][0]["route"]
        assert route["modality"] == expert and route["experts"] == [expert]


def test_text_requests_keep_the_text_routing(mm_server) -> None:
    srv, backend = mm_server
    r = chat(srv.url, "hello there", taskmoe={"trace": True})
    assert r.status_code == 200 and r.json()["taskmoe"]["choices"][0]["route"]["experts"][0] in ("a", "b")


def test_undecodable_and_oversized_media(mm_server) -> None:
    srv, backend = mm_server
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    r = chat(srv.url, [bad])
    assert r.status_code == 400 and "not a readable image" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "invalid_media"
    r = chat(srv.url, [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}])
    assert r.status_code == 400
    r = chat(srv.url, [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}}])
    assert r.status_code == 422  # the schema names the one format accepted
    big = encode_png(np.random.default_rng(0).random((400, 400)))  # > 1 MiB body after base64? no: > media limit
    backend.media_limits = backend.media_limits.replace(max_media_bytes=len(big) // 2)
    try:
        r = chat(srv.url, [image_url_part(big)])
    finally:
        backend.media_limits = type(backend.media_limits)()
    assert r.status_code == 413, r.text


def test_a_text_model_refuses_media(server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "expert", "messages": [{"role": "user", "content": [image_url_part(encode_png(IMG))]}]})
    assert r.status_code == 422  # not in a text server's schema at all
    schema = httpx.get(server.url + "/openapi.json").text
    assert "image_url" not in schema


def test_media_only_in_the_last_user_message(mm_server) -> None:
    srv, _ = mm_server
    body = {"model": "mm-tiny", "max_tokens": 2, "messages": [
        {"role": "user", "content": [image_url_part(encode_png(IMG))]}, {"role": "assistant", "content": "7"},
        {"role": "user", "content": "and this?"}]}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "last user message" in r.json()["error"]["message"]
