"""Media content parts: decoding, 413 size limits checked before decoding, 400 on undecodable media."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from taskmoe.data.media import encode_png, encode_wav
from taskmoe.serving.media import (MediaError, MediaLimits, decode_image_url, decode_input_audio, image_url_part,
                                   input_audio_part, media_prompt_of)

IMG = np.zeros((8, 8), np.float32)
IMG[2:6, 3:5] = 1.0


def test_text_image_and_audio_parts():
    p = media_prompt_of([{"type": "text", "text": "What digit"}, {"type": "text", "text": " is this?"},
                         image_url_part(encode_png(IMG))])
    assert p.text == "What digit is this? <image>" and p.modality == "image"  # the medium last, as trained
    assert np.allclose(p.value, IMG, atol=1 / 255)
    wav = np.sin(np.arange(800) / 5).astype(np.float32) * 0.5
    a = media_prompt_of([input_audio_part(encode_wav(wav, 8000)), {"type": "text", "text": "What digit is spoken?"}])
    assert a.text == "What digit is spoken? <audio>" and a.value[1] == 8000 and np.abs(a.value[0] - wav).max() < 1e-4
    assert media_prompt_of("plain").modality is None


def test_jpeg_data_url_and_whitespace_in_base64():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6), 30, np.uint8)).save(buf, "JPEG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    out = decode_image_url("data:image/jpeg;base64," + b64[:10] + "\n" + b64[10:], MediaLimits())
    assert out.shape == (6, 6)


@pytest.mark.parametrize("url, message", [
    ("https://example.com/x.png", "remote image URLs are not fetched"),
    ("data:image/png,abc", "not a base64 data URL"),
    ("data:image/gif;base64,R0lGOD", "image/gif"),
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not a png at all").decode(), "not a readable image"),
    ("data:image/png;base64," + base64.b64encode(encode_png(IMG)[:40]).decode(), "readable image"),
])
def test_undecodable_images_are_400(url, message):
    with pytest.raises(MediaError, match=message) as e:
        media_prompt_of([image_url_part(b"")["type"] and {"type": "image_url", "image_url": {"url": url}}])
    assert e.value.status == 400


def test_size_limits_are_413_before_decoding():
    lim = MediaLimits(max_media_bytes=4000, max_image_pixels=100, max_audio_seconds=0.05)
    big = base64.b64encode(b"\0" * 9000).decode()
    with pytest.raises(MediaError, match="exceeds the limit of 4000 bytes") as e:
        decode_image_url("data:image/png;base64," + big, lim)
    assert e.value.status == 413
    with pytest.raises(MediaError, match="11x11 pixels") as e:  # the header is read, the pixels never decoded
        decode_image_url(image_url_part(encode_png(np.zeros((11, 11))))["image_url"]["url"], lim)
    assert e.value.status == 413
    with pytest.raises(MediaError, match="0.1 s exceeds") as e:
        decode_input_audio(input_audio_part(encode_wav(np.zeros(800), 8000))["input_audio"], lim)
    assert e.value.status == 413


@pytest.mark.parametrize("part, message", [
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}, "'mp3' is not supported"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFFjunk").decode(), "format": "wav"}},
     "not a readable PCM wav"),
    ({"type": "input_audio", "input_audio": "x"}, "expected an object"),
    ({"type": "video_url", "video_url": {}}, "'video_url' is not one of"),
    ({"type": "text", "text": 3}, "expected a string"),
])
def test_bad_parts_are_400(part, message):
    with pytest.raises(MediaError, match=message) as e:
        media_prompt_of([part])
    assert e.value.status == 400


def test_one_medium_per_request():
    part = image_url_part(encode_png(IMG))
    with pytest.raises(MediaError, match="2 media parts"):
        media_prompt_of([part, part])
