"""Media readers: IDX arrays (MNIST), wav audio (FSDD), PNG/JPEG images, and the bundled 8x8 digits.

Every reader returns plain numpy arrays in one convention, so encoders never see file formats:

- **images** ``(H, W)`` float32 in ``[0, 1]``, grayscale, *bright strokes on a dark background*
  (MNIST's convention); a batch is ``(N, H, W)``.
- **audio** ``(S,)`` float32 in ``[-1, 1]``, mono, with its sample rate in Hz.

Design choices:

- **Stdlib + numpy only** (``gzip``, ``struct``, ``wave``; Pillow for PNG/JPEG, which matplotlib
  already installs): no torchaudio (its wheels pin a torch version) and nothing downloaded.
- **Clear errors.** A truncated, malformed or unsupported file raises :class:`DataError` naming
  the file (or ``what`` for in-memory bytes) and what was wrong: the IDX magic, a header that
  promises more bytes than the file has, a wav that is not PCM.
- **User images are normalised, not guessed at**: converted to grayscale; a picture whose border
  is brighter than its centre (dark ink on white paper) is inverted to MNIST's convention
  (``invert="auto"``; pass ``True``/``False`` to decide yourself).
- **Resampling** (:func:`resample`) is linear interpolation, enough for speech at 8-16 kHz; a
  wav at another rate than an encoder's is resampled before its spectrogram.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import wave
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from taskmoe.errors import DataError

__all__ = [
    "read_idx", "read_mnist", "read_wav", "decode_wav", "decode_image", "read_image", "resample", "load_digits_8x8",
    "fsdd_files", "FSDD_NAME", "encode_png", "encode_wav", "parse_idx",
]

IDX_TYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FSDD_NAME = re.compile(r"^(?P<digit>\d)_(?P<speaker>[A-Za-z]+)_(?P<index>\d+)\.wav$")


# ------------------------------------------------------------------------------------ IDX
def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: truncated or corrupt gzip data ({e})") from e
    return raw


def parse_idx(data: bytes, what: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, then the values."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{what}: not an IDX file (magic {data[:4].hex() or 'empty'}, expected 0000<type><ndim>)")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        raise DataError(f"{what}: unknown IDX element type 0x{code:02x} (known: {[hex(c) for c in IDX_TYPES]})")
    if ndim == 0:
        raise DataError(f"{what}: IDX header has 0 dimensions")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise DataError(f"{what}: truncated IDX header ({len(data)} bytes, header needs {head})")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    dtype = np.dtype(IDX_TYPES[code])
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(data) - head
    if have != need:
        kind = "truncated" if have < need else "has trailing bytes"
        raise DataError(f"{what}: IDX file {kind}: header {tuple(dims)} x {dtype.itemsize} B = {need} bytes of data, "
                        f"file has {have}")
    return np.frombuffer(data, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array of its declared type and shape."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def read_mnist(folder: str | Path, split: Literal["train", "test"] = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``(images (N, 28, 28) float32 in [0, 1], labels (N,) int64)`` from the four IDX files in ``folder``."""
    folder = Path(folder)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"read_mnist: split must be 'train' or 'test', got {split!r}")

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
        raise DataError(f"{folder}: no {stem}[.gz] (an MNIST folder holds {prefix}-images-idx3-ubyte.gz and "
                        f"{prefix}-labels-idx1-ubyte.gz)")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: MNIST {split} images {images.shape} and labels {labels.shape} do not match")
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images, shipped in the wheel): ``(N, 8, 8)`` in [0, 1], labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


# ------------------------------------------------------------------------------------ wav
def decode_wav(data: bytes, what: str = "wav data") -> tuple[np.ndarray, int]:
    """PCM wav bytes -> ``(samples (S,) float32 in [-1, 1], sample_rate)``; channels are averaged."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            frames = w.readframes(n)
    except (wave.Error, EOFError, struct.error) as e:
        raise DataError(f"{what}: not a readable PCM wav file ({e})") from e
    if width not in (1, 2, 4):
        raise DataError(f"{what}: {8 * width}-bit samples are not supported (8, 16 or 32-bit PCM)")
    if channels < 1 or rate <= 0:
        raise DataError(f"{what}: wav header has {channels} channels at {rate} Hz")
    if len(frames) != n * width * channels:
        raise DataError(f"{what}: truncated wav: header promises {n} frames ({n * width * channels} bytes), "
                        f"data has {len(frames)}")
    if n == 0:
        raise DataError(f"{what}: wav file has no samples")
    if width == 1:  # 8-bit wav is unsigned
        x = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        x = np.frombuffer(frames, dtype=f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    return x.reshape(n, channels).mean(axis=1), rate


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM wav file as ``(samples, sample_rate)``; see :func:`decode_wav`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    return decode_wav(data, str(path))


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling: ``y[j] = x(j * rate / target)``, ``len(y) = round(len(x) * target / rate)``."""
    if rate == target:
        return x.astype(np.float32, copy=False)
    n = max(1, int(round(len(x) * target / rate)))
    t = np.arange(n, dtype=np.float64) * (rate / target)
    return np.interp(t, np.arange(len(x), dtype=np.float64), x).astype(np.float32)


def fsdd_files(folder: str | Path) -> list[tuple[Path, int, str, int]]:
    """FSDD recordings ``(path, digit, speaker, index)`` sorted by name (``{digit}_{speaker}_{index}.wav``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: FSDD recordings folder not found")
    out = []
    for p in sorted(folder.iterdir()):
        m = FSDD_NAME.match(p.name)
        if m:
            out.append((p, int(m["digit"]), m["speaker"], int(m["index"])))
    if not out:
        raise DataError(f"{folder}: no files named {{digit}}_{{speaker}}_{{index}}.wav")
    return out


# ---------------------------------------------------------------------------------- images
def decode_image(data: bytes, what: str = "image data", *, invert: bool | Literal["auto"] = "auto") -> np.ndarray:
    """PNG/JPEG (any format Pillow reads) bytes -> ``(H, W)`` float32 in [0, 1], bright strokes on dark.

    ``invert="auto"`` inverts when the mean of the outer ring of pixels exceeds the mean of the
    whole image (a dark drawing on a light background).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            gray = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{what}: not a readable image ({e})") from e
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise DataError(f"{what}: decoded image has shape {gray.shape}")
    if invert == "auto":
        ring = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        invert = bool(ring.mean() > gray.mean())
    return 1.0 - gray if invert else gray


def read_image(path: str | Path, *, invert: bool | Literal["auto"] = "auto") -> np.ndarray:
    """An image file as ``(H, W)`` float32 in [0, 1]; see :func:`decode_image`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    return decode_image(data, str(path), invert=invert)


def encode_png(image: np.ndarray) -> bytes:
    """``(H, W)`` float in [0, 1] -> 8-bit grayscale PNG bytes (for tests, examples and clients)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def encode_wav(samples: np.ndarray, rate: int) -> bytes:
    """``(S,)`` float in [-1, 1] -> 16-bit mono PCM wav bytes."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(np.rint(np.clip(np.asarray(samples), -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()
