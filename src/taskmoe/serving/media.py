"""Media content parts of OpenAI-style chat messages: decoding, size limits, and the prompt they make.

Accepted parts (OpenAI's chat completions format)::

    {"type": "text", "text": "What digit is this?"}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}}
    {"type": "input_audio", "input_audio": {"data": "<base64 wav>", "format": "wav"}}

Pure functions, no web framework: :func:`media_prompt_of` turns a message's content (a string or
a list of parts) into the prompt text, the medium's marker (``<image>`` / ``<audio>``) first --
where the models were trained to see it, wherever the client put the part -- and the decoded medium (:mod:`taskmoe.data.media` conventions). Every problem is
a :class:`MediaError` carrying the HTTP status the server answers with:

- 413 when the encoded data, the decoded image (pixels) or the audio (seconds) exceed
  :class:`MediaLimits` -- checked before decoding where possible (base64 length, image header);
- 400 for everything undecodable: not a ``data:`` URL (remote URLs are never fetched), bad
  base64, a MIME type or audio format we do not read, bytes Pillow / ``wave`` reject, more than
  one medium in a request.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from taskmoe.config import Config, check, doc
from taskmoe.data.media import decode_image, decode_wav
from taskmoe.data.media_tasks import with_marker
from taskmoe.errors import DataError, RequestError

IMAGE_MIME = ("image/png", "image/jpeg", "image/jpg")
AUDIO_FORMATS = ("wav",)
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[\w.+-]+=[\w.+-]+)*;base64,(?P<data>.*)$", re.S)


class MediaError(RequestError):
    """A media part the server refuses; ``status`` is the HTTP status to answer with (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class MediaLimits(Config):
    max_media_bytes: int = doc(512 * 1024, "largest encoded (decoded-from-base64) image or audio file, in bytes")
    max_image_pixels: int = doc(1024 * 1024, "largest image, width x height")
    max_audio_seconds: float = doc(30.0, "longest audio clip")

    def validate(self) -> None:
        check(self.max_media_bytes > 0 and self.max_image_pixels > 0 and self.max_audio_seconds > 0,
              "MediaLimits: every limit must be > 0")


@dataclass
class MediaPrompt:
    """A message's text (with the medium's marker, if any) and its decoded medium."""

    text: str
    modality: str | None = None
    value: Any = None


def b64decode(data: Any, where: str, limits: MediaLimits) -> bytes:
    """Strict base64 -> bytes; 413 if the result would exceed ``max_media_bytes`` (checked on the length first)."""
    if not isinstance(data, str) or not data:
        raise MediaError(f"{where}: expected a non-empty base64 string")
    if len(data) * 3 // 4 > limits.max_media_bytes + 3:
        raise MediaError(f"{where}: media of about {len(data) * 3 // 4} bytes exceeds the limit of "
                         f"{limits.max_media_bytes} bytes", status=413)
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", data), validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{where}: invalid base64 ({e})") from e
    if len(raw) > limits.max_media_bytes:
        raise MediaError(f"{where}: media of {len(raw)} bytes exceeds the limit of {limits.max_media_bytes} bytes", status=413)
    return raw


def decode_image_url(url: Any, limits: MediaLimits, where: str = "image_url.url") -> np.ndarray:
    """A ``data:image/png;base64,...`` (or jpeg) URL -> ``(H, W)`` float32 image."""
    if not isinstance(url, str):
        raise MediaError(f"{where}: expected a string")
    m = DATA_URL.match(url)
    if m is None:
        kind = "remote image URLs are not fetched" if url.startswith(("http://", "https://")) else "not a base64 data URL"
        raise MediaError(f"{where}: {kind}; send data:image/png;base64,<data>")
    if m["mime"].lower() not in IMAGE_MIME:
        raise MediaError(f"{where}: image type {m['mime']!r} is not supported (use {', '.join(IMAGE_MIME[:2])})")
    raw = b64decode(m["data"], where, limits)
    from PIL import Image

    try:  # the header alone tells the size: refuse a decompression bomb before decoding it
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on garbage
        raise MediaError(f"{where}: not a readable image ({e})") from e
    if w * h > limits.max_image_pixels:
        raise MediaError(f"{where}: image of {w}x{h} pixels exceeds the limit of {limits.max_image_pixels} pixels",
                         status=413)
    try:
        return decode_image(raw, where)
    except DataError as e:
        raise MediaError(str(e)) from e


def decode_input_audio(part: Any, limits: MediaLimits, where: str = "input_audio") -> tuple[np.ndarray, int]:
    """``{"data": base64, "format": "wav"}`` -> ``(samples, sample_rate)``."""
    if not isinstance(part, Mapping):
        raise MediaError(f"{where}: expected an object with 'data' and 'format'")
    fmt = part.get("format")
    if fmt not in AUDIO_FORMATS:
        raise MediaError(f"{where}.format: {fmt!r} is not supported (use {', '.join(AUDIO_FORMATS)})")
    raw = b64decode(part.get("data"), f"{where}.data", limits)
    try:
        x, rate = decode_wav(raw, f"{where}.data")
    except DataError as e:
        raise MediaError(str(e)) from e
    if len(x) / rate > limits.max_audio_seconds:
        raise MediaError(f"{where}: audio of {len(x) / rate:.1f} s exceeds the limit of {limits.max_audio_seconds} s",
                         status=413)
    return x, rate


def media_prompt_of(content: str | Sequence[Mapping[str, Any]], limits: MediaLimits | None = None,
                    where: str = "content") -> MediaPrompt:
    """A message content -> :class:`MediaPrompt`; text parts are joined, the medium's marker after them."""
    limits = limits or MediaLimits()
    if isinstance(content, str):
        return MediaPrompt(content)
    if not isinstance(content, (list, tuple)):
        raise MediaError(f"{where}: expected a string or a list of content parts")
    pieces: list[str] = []
    found: list[tuple[str, Any]] = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise MediaError(f"{at}.text: expected a string")
            pieces.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, Mapping) else spec
            found.append(("image", decode_image_url(url, limits, f"{at}.image_url.url")))
        elif kind == "input_audio":
            found.append(("audio", decode_input_audio(part.get("input_audio"), limits, f"{at}.input_audio")))
        else:
            raise MediaError(f"{at}.type: {kind!r} is not one of 'text', 'image_url', 'input_audio'")
    if len(found) > 1:
        raise MediaError(f"{where}: {len(found)} media parts; one image or audio clip per request is supported")
    text = " ".join("".join(pieces).split())
    if not found:
        return MediaPrompt(text)
    return MediaPrompt(with_marker(text, found[0][0]), found[0][0], found[0][1])  # the medium last, as trained


def image_url_part(png: bytes) -> dict[str, Any]:
    """An ``image_url`` content part for PNG bytes (what clients send)."""
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def input_audio_part(wav: bytes) -> dict[str, Any]:
    """An ``input_audio`` content part for wav bytes."""
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
