"""Media question/answer tasks: prompt templates, the placeholder splice in token ids, and a torch dataset.

A media prompt is text with one marker (``<image>`` or ``<audio>``, :data:`MEDIA_MARKERS`) where the
medium goes. :func:`media_prompt` turns it into token ids with ``n`` *placeholder positions* at the
marker and a boolean mask of those positions; a multimodal model replaces the embeddings at the
mask with its encoder's ``n`` output vectors (LLaVA's splice).

Design choices:

- **The placeholder is a position, not a vocabulary entry.** The positions hold a token id no
  prompt otherwise contains (:func:`media_placeholder`: ``<|pad|>`` of a taskmoe tokenizer; for a
  pretrained backbone's tokenizer, whose pad is often its eos, a spare special token) and their
  embeddings are always overwritten, so the tokenizer and the model's vocabulary stay exactly as
  trained: adding a modality changes no text token id, no embedding row and no logit. The marker strings are parsed only out of prompts
  that come with a medium; with ``allow_special=False`` text is encoded as plain bytes around them.
- **The medium goes last, right before the answer** (``"What digit is this? <image>"`` -> ``"7"``,
  the issue's form; a prompt without a marker gets it appended): the answer's first token is then
  predicted at the medium's last position, the encoder's pooled summary of it, which reads the
  question by attention with a query the projector controls (see
  :mod:`taskmoe.doe.modality.encoders` for what that measured).
- **Answers are generated text.** Each modality has a question template whose answer is the digit
  (``"7"``) and a caption-style template whose answer is words (``"a handwritten seven"``,
  ``"seven"``); the sequence is ``<|bos|> prompt <|eos|>``-free: ``prompt + answer + <|eos|>``.
- Items carry their medium as a float tensor of a fixed shape (images resized by the caller,
  audio cropped or zero-padded to ``clip_samples``), so a batch stacks without per-row shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from taskmoe.data.backbone_tokenizer import BackboneTokenizer
from taskmoe.data.datasets import IGNORE_INDEX
from taskmoe.data.media import fsdd_files, load_digits_8x8, read_mnist, read_wav, resample
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.errors import DataError

MEDIA_MARKERS: dict[str, str] = {"image": "<image>", "audio": "<audio>"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Template:
    """A prompt with a marker and an answer pattern (``{digit}`` and ``{word}`` are filled in)."""

    prompt: str
    answer: str

    def fill(self, label: int) -> str:
        return self.answer.format(digit=label, word=DIGIT_WORDS[label])


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "image": (Template("What digit is this? <image>", "{digit}"),
              Template("Describe the image. <image>", "a handwritten {word}")),
    "audio": (Template("What digit is spoken? <audio>", "{digit}"),
              Template("Transcribe the audio. <audio>", "{word}")),
}


def check_modality(modality: str) -> str:
    if modality not in MEDIA_MARKERS:
        raise DataError(f"unknown modality {modality!r}; known: {sorted(MEDIA_MARKERS)}")
    return modality


def with_marker(text: str, modality: str) -> str:
    """``text`` with exactly one marker of ``modality`` (appended after a space when absent)."""
    marker = MEDIA_MARKERS[check_modality(modality)]
    n = text.count(marker)
    if n > 1:
        raise DataError(f"prompt has {n} {marker} markers; one medium per prompt is supported")
    return text if n == 1 else f"{text.rstrip()} {marker}".lstrip()


def media_placeholder(tok: Tokenizer) -> int:
    """The token id placeholder positions hold: one plain text never encodes to and no prompt contains.

    A taskmoe tokenizer: ``<|pad|>``. A backbone's: its pad token when that is neither its bos nor
    its eos, else the last special token of its vocabulary that is not bos/eos/pad and does not
    occur in its chat template (SmolLM2: ``<empty_output>``), else its unk token.
    """
    ids = tok.special_ids
    if not isinstance(tok, BackboneTokenizer) or ids["<|pad|>"] not in (ids["<|bos|>"], ids["<|eos|>"]):
        return tok.pad_id
    roles = set(ids.values())
    template = tok.chat_template or ""
    spare = [i for i, t in sorted(tok._tok.get_added_tokens_decoder().items())
             if t.special and i not in roles and t.content not in template]
    if spare:
        return spare[-1]
    if ids.get("<|unk|>") not in (None, ids["<|bos|>"], ids["<|eos|>"]):
        return ids["<|unk|>"]
    raise DataError("media_placeholder: the tokenizer has no special token to spare for media placeholders "
                    "(its pad is its bos/eos and it has no other special or unk token)")


def media_prompt(tok: Tokenizer, text: str, modality: str, n_positions: int,
                 placeholder: int | None = None) -> tuple[list[int], list[int]]:
    """Ids ``prompt(before) + [placeholder] * n + enc(after)`` and the placeholder positions.

    ``before``/``after`` are the text on either side of the (single) marker, encoded as plain text,
    ``before`` as a completion prompt (:meth:`Tokenizer.encode_prompt`: after ``<|bos|>`` for a taskmoe
    tokenizer, after whatever a backbone's tokenizer adds, so the text is what that model reads for
    the same words without a medium); ``placeholder`` defaults to :func:`media_placeholder`.
    """
    if n_positions < 1:
        raise DataError(f"media_prompt: n_positions must be >= 1, got {n_positions}")
    before, after = with_marker(text, modality).split(MEDIA_MARKERS[modality])
    head = tok.encode_prompt(before)
    tail = tok.encode(after, allow_special=False) if after else []
    fill = media_placeholder(tok) if placeholder is None else placeholder
    return head + [fill] * n_positions + tail, list(range(len(head), len(head) + n_positions))


class MediaQA(Dataset):
    """Media + template -> answer sequences for training a modality expert.

    ``media`` (N, ...) float tensor, ``labels`` (N,) digits; example ``i`` uses template
    ``i % len(templates)``. Item: ``input_ids`` (T,), ``targets`` (T,) (``-100`` except on the answer
    and its ``<|eos|>``), ``prompt_mask`` (T,) (the prompt, placeholders included), ``media_mask`` (T,)
    (the placeholders), ``media`` (...), ``label`` (), ``length`` () -- all right-padded to the
    longest template, ``T = max length - 1`` (inputs ``seq[:-1]``, targets ``seq[1:]``). With
    ``negatives`` (M, P) (text prompts, the gate's negative examples) an item also holds
    ``negative_ids`` (P,) = ``negatives[i % M]``.
    """

    def __init__(self, tok: Tokenizer, modality: str, media: torch.Tensor, labels: Sequence[int], n_positions: int,
                 templates: Sequence[Template] | None = None, negatives: torch.Tensor | None = None,
                 placeholder: int | None = None) -> None:
        self.modality = check_modality(modality)
        self.templates = tuple(templates or TEMPLATES[modality])
        if len(media) != len(labels):
            raise DataError(f"MediaQA: {len(media)} media but {len(labels)} labels")
        if len(media) == 0:
            raise DataError("MediaQA: no examples")
        self.media = media.float()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.n_positions = n_positions
        # token ids of every (template, label) pair: few distinct sequences, built once
        self._seqs: dict[tuple[int, int], tuple[list[int], int, list[int]]] = {}
        for t, tpl in enumerate(self.templates):
            for d in range(len(DIGIT_WORDS)):
                prompt, pos = media_prompt(tok, tpl.prompt, modality, n_positions, placeholder)
                answer = tok.encode(tpl.fill(d), allow_special=False) + [tok.eos_id]
                self._seqs[(t, d)] = (prompt + answer, len(prompt), pos)
        self.seq_len = max(len(s) for s, _, _ in self._seqs.values()) - 1
        self.pad_id = tok.pad_id
        self.negatives = negatives

    def __len__(self) -> int:
        return len(self.labels)

    def template_of(self, i: int) -> int:
        return i % len(self.templates)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        lab = int(self.labels[i])
        seq, plen, pos = self._seqs[(self.template_of(i), lab)]
        T = self.seq_len
        full = torch.full((T + 1,), self.pad_id, dtype=torch.long)
        full[: len(seq)] = torch.tensor(seq)
        targets = full[1:].clone()
        t = torch.arange(T)
        targets[(t < plen - 1) | (t >= len(seq) - 1)] = IGNORE_INDEX  # only the answer and its <|eos|>
        media_mask = torch.zeros(T, dtype=torch.bool)
        media_mask[pos] = True
        item = {"input_ids": full[:-1], "targets": targets, "prompt_mask": t < plen, "media_mask": media_mask,
                "media": self.media[i], "label": self.labels[i], "length": torch.tensor(len(seq) - 1)}
        if self.negatives is not None:
            item["negative_ids"] = self.negatives[i % len(self.negatives)]
        return item


def fit_audio(x: np.ndarray, clip_samples: int) -> np.ndarray:
    """Crop to the first ``clip_samples`` samples or zero-pad at the end: ``(clip_samples,)`` float32."""
    out = np.zeros(clip_samples, dtype=np.float32)
    n = min(len(x), clip_samples)
    out[:n] = x[:n]
    return out


def synth_digit_audio(digit: int, n: int, rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """``n`` synthetic "spoken digit" clips: a two-tone chord ``f1 = 300 + 150 d`` Hz, ``f2 = 2 f1 + 100``,
    random phase, amplitude 0.3-0.7, a random onset and white noise (sigma 0.02). For tests and demos
    where no recordings exist; each digit is a distinct spectrum, so a log-mel model can learn them."""
    rng = np.random.default_rng(seed * 1000 + digit)
    S = int(rate * seconds)
    t = np.arange(S) / rate
    f1 = 300.0 + 150.0 * digit
    out = np.zeros((n, S), dtype=np.float32)
    for i in range(n):
        on = rng.integers(0, S // 4)
        a = rng.uniform(0.3, 0.7)
        tone = a * np.sin(2 * np.pi * f1 * t + rng.uniform(0, 6.3)) + 0.5 * a * np.sin(2 * np.pi * (2 * f1 + 100) * t)
        tone[:on] = 0.0
        out[i] = tone + rng.normal(0, 0.02, S)
    return np.clip(out, -1, 1)


# ----------------------------------------------------------------------------- digit data
def digit_images(folder: str | Path | None, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Digit images ``(N, H, W)`` in [0, 1] and labels: MNIST from ``folder`` (IDX files), or with
    ``folder=None`` scikit-learn's bundled 8x8 digits (test = every 5th image, train = the rest)."""
    if split not in ("train", "test"):
        raise DataError(f"digit_images: split must be 'train' or 'test', got {split!r}")
    if folder:
        x, y = read_mnist(folder, split)  # type: ignore[arg-type]
    else:
        x, y = load_digits_8x8()
        keep = (np.arange(len(y)) % 5 == 0) == (split == "test")
        x, y = x[keep], y[keep]
    return torch.from_numpy(np.ascontiguousarray(x)), y


def digit_audio(folder: str | Path | None, split: str, sample_rate: int, clip_samples: int,
                synth_per_digit: int = 40) -> tuple[torch.Tensor, np.ndarray]:
    """Spoken digits ``(N, clip_samples)`` at ``sample_rate`` and labels: FSDD recordings from ``folder``
    (official split: file index 0-4 is test), or with ``folder=None`` :func:`synth_digit_audio` tones
    (``synth_per_digit`` per digit for train, a quarter as many with another seed for test)."""
    if split not in ("train", "test"):
        raise DataError(f"digit_audio: split must be 'train' or 'test', got {split!r}")
    if folder:
        rows, labels = [], []
        for path, digit, _speaker, index in fsdd_files(folder):
            if (index < 5) != (split == "test"):
                continue
            x, rate = read_wav(path)
            rows.append(fit_audio(resample(x, rate, sample_rate), clip_samples))
            labels.append(digit)
        return torch.from_numpy(np.stack(rows)), np.asarray(labels, dtype=np.int64)
    n = synth_per_digit if split == "train" else max(1, synth_per_digit // 4)
    seed = 0 if split == "train" else 1
    clips = [fit_audio(c, clip_samples) for d in range(10)
             for c in synth_digit_audio(d, n, sample_rate, clip_samples / sample_rate, seed)]
    return torch.from_numpy(np.stack(clips)), np.repeat(np.arange(10, dtype=np.int64), n)
