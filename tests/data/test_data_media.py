"""Media readers and media tasks: exact round trips, clear errors on corrupted bytes, the placeholder splice."""

from __future__ import annotations

import gzip
import struct
import wave
import io

import numpy as np
import pytest
import torch

from taskmoe.data.media import (decode_image, decode_wav, encode_png, encode_wav, fsdd_files, load_digits_8x8,
                                parse_idx, read_idx, read_mnist, read_wav, resample)
from taskmoe.data.media_tasks import (IGNORE_INDEX, MediaQA, Template, digit_audio, digit_images, fit_audio,
                                      media_prompt, synth_digit_audio, with_marker)
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.errors import DataError


def idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(">u1").tobytes()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["What digit is this? a handwritten seven zero one two 0123456789"] * 20, 300,
                           show_progress=False)


# ------------------------------------------------------------------------------------ IDX
def test_idx_round_trip_raw_and_gzip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(a)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)


def test_idx_int32_big_endian():
    a = np.array([1, -2, 70000], dtype=">i4")
    data = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + a.tobytes()
    assert parse_idx(data).tolist() == [1, -2, 70000]


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\0", "trailing"),
    (lambda b: b"\x12\x34" + b[2:], "not an IDX"),
    (lambda b: b[:2] + b"\x07" + b[3:], "element type"),
    (lambda b: b[:6], "truncated IDX header"),
])
def test_idx_corrupted_bytes_name_the_problem(tmp_path, mangle, message):
    f = tmp_path / "bad-images-idx3-ubyte"
    f.write_bytes(mangle(idx_bytes(np.zeros((2, 3, 3), np.uint8))))
    with pytest.raises(DataError, match=message) as e:
        read_idx(f)
    assert str(f) in str(e.value)


def test_truncated_gzip_is_a_data_error(tmp_path):
    f = tmp_path / "x.gz"
    noise = np.random.default_rng(0).integers(0, 256, (50, 28, 28)).astype(np.uint8)
    f.write_bytes(gzip.compress(idx_bytes(noise))[:1000])
    with pytest.raises(DataError, match="gzip"):
        read_idx(f)


def test_read_mnist_pairs_images_and_labels(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([3, 1, 4, 1, 5], np.uint8)))
    x, y = read_mnist(tmp_path, "test")
    assert x.dtype == np.float32 and np.allclose(x * 255, imgs) and y.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        read_mnist(tmp_path, "train")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([3, 1], np.uint8)))
    with pytest.raises(DataError, match="do not match"):
        read_mnist(tmp_path, "test")


# ------------------------------------------------------------------------------------ wav
def test_wav_round_trip_and_resample():
    t = np.arange(8000) / 8000
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    y, rate = decode_wav(encode_wav(x, 8000))
    assert rate == 8000 and np.abs(y - x).max() <= 2 / 32768
    z = resample(y, 8000, 16000)
    assert len(z) == 16000 and np.allclose(z[::2], y, atol=1e-6)  # even samples are the originals
    assert np.array_equal(resample(y, 8000, 8000), y)


def test_wav_stereo_and_8bit_are_averaged_to_mono():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2), w.setsampwidth(1), w.setframerate(4000)
        w.writeframes(bytes([128 + 64, 128, 128 - 64, 128]))  # frames (0.5, 0), (-0.5, 0)
    y, rate = decode_wav(buf.getvalue())
    assert rate == 4000 and np.allclose(y, [0.25, -0.25])


def test_wav_corrupted_bytes(tmp_path):
    good = encode_wav(np.zeros(1000, np.float32), 8000)
    f = tmp_path / "cut.wav"
    f.write_bytes(good[:-101])
    with pytest.raises(DataError, match="truncated wav") as e:
        read_wav(f)
    assert str(f) in str(e.value)
    with pytest.raises(DataError, match="not a readable PCM wav"):
        decode_wav(b"RIFF\x00\x00junkjunkjunk", "upload")
    with pytest.raises(DataError, match="no samples"):
        decode_wav(encode_wav(np.zeros(0, np.float32), 8000))


def test_fsdd_names_and_split(tmp_path):
    for name in ["3_jackson_0.wav", "3_jackson_7.wav", "9_theo_4.wav", "README.md"]:
        (tmp_path / name).write_bytes(encode_wav(np.full(200, 0.1, np.float32), 8000))
    files = fsdd_files(tmp_path)
    assert [(d, s, i) for _, d, s, i in files] == [(3, "jackson", 0), (3, "jackson", 7), (9, "theo", 4)]
    x, y = digit_audio(tmp_path, "test", 8000, 400)
    assert x.shape == (2, 400) and y.tolist() == [3, 9] and torch.all(x[:, 200:] == 0)
    x, y = digit_audio(tmp_path, "train", 16000, 300)  # resampled to 16 kHz, cropped
    assert x.shape == (1, 300) and y.tolist() == [3]


# ---------------------------------------------------------------------------------- images
def test_png_round_trip_and_auto_invert():
    img = np.zeros((10, 12), np.float32)
    img[3:7, 4:8] = 1.0  # a bright stroke on black: kept as is
    assert np.allclose(decode_image(encode_png(img)), img, atol=1 / 255)
    assert np.allclose(decode_image(encode_png(1 - img)), img, atol=1 / 255)  # dark ink on white: inverted
    assert np.allclose(decode_image(encode_png(1 - img), invert=False), 1 - img, atol=1 / 255)


def test_jpeg_decodes():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, "JPEG")
    out = decode_image(buf.getvalue(), invert=False)
    assert out.shape == (8, 8) and abs(float(out.mean()) - 200 / 255) < 0.02


NOISE_PNG = encode_png(np.random.default_rng(0).random((64, 64)))


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n garbage", NOISE_PNG[: len(NOISE_PNG) // 2]])
def test_undecodable_images(data):
    with pytest.raises(DataError, match="upload.png: not a readable image"):
        decode_image(data, "upload.png")


def test_bundled_digits_split():
    x, y = load_digits_8x8()
    assert x.shape == (1797, 8, 8) and float(x.max()) == 1.0
    tr, ytr = digit_images(None, "train")
    te, yte = digit_images(None, "test")
    assert len(tr) + len(te) == 1797 and len(te) == 360 and torch.equal(te[0], torch.from_numpy(x[0]))


# ------------------------------------------------------------------------------ prompts, QA
def test_media_prompt_splices_placeholder_positions(tok):
    ids, pos = media_prompt(tok, "What digit is this? <image> now", "image", 4)
    head = [tok.bos_id, *tok.encode("What digit is this? ", allow_special=False)]
    assert ids[: len(head)] == head and pos == list(range(len(head), len(head) + 4))
    assert all(ids[p] == tok.pad_id for p in pos) and ids[len(head) + 4:] == tok.encode(" now", allow_special=False)
    assert media_prompt(tok, "What digit is this?", "image", 4) == media_prompt(tok, "What digit is this? <image>", "image", 4)
    ids, pos = media_prompt(tok, "What?", "audio", 2)
    assert pos == [len(ids) - 2, len(ids) - 1]  # appended: the medium last, right before the answer
    assert media_prompt(tok, "<audio> What?", "audio", 2)[1] == [1, 2]  # an explicit marker stays where it is
    assert media_prompt(tok, "What?", "audio", 2, placeholder=7)[0][-2:] == [7, 7]
    assert tok.pad_id not in tok.encode("text with <|pad|> typed", allow_special=False)
    with pytest.raises(DataError, match="2 <image> markers"):
        with_marker("<image> <image>", "image")
    with pytest.raises(DataError, match="unknown modality"):
        with_marker("x", "video")


def test_media_qa_targets_only_the_answer(tok):
    media = torch.rand(4, 8, 8)
    qa = MediaQA(tok, "image", media, [7, 7, 0, 0], 3, templates=[Template("<image> What digit is this?", "{digit}"),
                                                                  Template("<image> Describe", "a handwritten {word}")],
                 negatives=torch.ones(3, 5, dtype=torch.long))
    a, b = qa[0], qa[1]
    want = tok.encode("7", allow_special=False) + [tok.eos_id]
    assert a["targets"][a["targets"] != IGNORE_INDEX].tolist() == want
    assert b["targets"][b["targets"] != IGNORE_INDEX].tolist() == tok.encode("a handwritten seven", allow_special=False) + [tok.eos_id]
    assert int(a["media_mask"].sum()) == 3 and torch.equal(a["media"], media[0])
    assert torch.all(a["input_ids"][a["media_mask"]] == tok.pad_id)
    first_target = int((a["targets"] != IGNORE_INDEX).nonzero()[0])
    assert bool(a["prompt_mask"][first_target]) and not bool(a["prompt_mask"][first_target + 1])  # prompt ends there
    assert a["negative_ids"].shape == (5,)


def test_synthetic_audio_is_deterministic_and_fitted():
    a = synth_digit_audio(3, 2, 8000, 0.5, seed=0)
    assert a.shape == (2, 4000) and np.array_equal(a, synth_digit_audio(3, 2, 8000, 0.5, seed=0))
    assert not np.array_equal(a, synth_digit_audio(3, 2, 8000, 0.5, seed=1))
    assert fit_audio(np.ones(3, np.float32), 5).tolist() == [1, 1, 1, 0, 0]
    x, y = digit_audio(None, "test", 8000, 4000, synth_per_digit=8)
    assert x.shape == (20, 4000) and sorted(set(y.tolist())) == list(range(10))


@pytest.mark.shared
def test_shared_mnist_and_fsdd(shared):
    x, y = read_mnist(shared / "data/images/mnist", "test")
    assert x.shape == (10000, 28, 28) and np.bincount(y).min() > 800
    files = fsdd_files(shared / "data/audio/fsdd/recordings")
    assert len(files) == 3000 and sum(i < 5 for *_, i in files) == 300
    s, rate = read_wav(files[0][0])
    assert rate == 8000 and s.ndim == 1 and np.abs(s).max() <= 1
