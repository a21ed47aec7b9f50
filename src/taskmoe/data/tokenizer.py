"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with taskmoe's special tokens and chat template.

Design choices:

- **Byte level.** ``ByteLevel`` pre-tokenizer and decoder with the 256-byte initial alphabet, so
  any text round-trips exactly (``decode(encode(t)) == t``) and ``<|unk|>`` is never produced
  by ordinary text (it exists for the shared contract and for pretrained vocabularies).
- **Special tokens first.** :data:`SPECIAL_TOKENS` take ids 0..11 in a freshly trained
  tokenizer. A pretrained ``tokenizer.json`` that lacks them gets them appended.
- **No implicit specials.** :meth:`Tokenizer.encode` adds no BOS/EOS; whoever builds a
  sequence adds them (``data.datasets`` does, in one place). ``encode`` recognises special-token
  strings in its input (needed to encode a rendered chat template); pass
  ``allow_special=False`` for untrusted text, which is then encoded as plain bytes.
  :meth:`Tokenizer.encode_chat` does that for message contents, so a user cannot forge a
  role token.
- **Chat template.** ``<|bos|>`` then, per message, ``<|role|>content<|eos|>``; with
  ``add_generation_prompt`` it ends with an open ``<|assistant|>``. Roles: system, user,
  assistant, expert. Every model sequence in taskmoe starts with ``<|bos|>``.
- The summarizer's expert sections use ``<|expert|>``, ``<|draft|>``/``<|end_draft|>``,
  ``<|answer|>`` and ``<|clarify|>``; their layout is the summarizer's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer

from taskmoe.errors import DataError
from taskmoe.io import atomic_write_text

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|unk|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|expert|>",
    "<|draft|>",
    "<|end_draft|>",
    "<|answer|>",
    "<|clarify|>",
)
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "expert")
TOKENIZER_FILE = "tokenizer.json"


def _special_id(token: str) -> property:
    """A read-only ``Tokenizer`` property: the id of special ``token``."""

    def get(self: "Tokenizer") -> int:
        return self.special_ids[token]

    return property(get, doc=f"id of the {token} special token")


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"chat message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"chat message {i}: role {m['role']!r} is not one of {list(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"chat message {i}: content must be a string, got {type(m['content']).__name__}")


class Tokenizer:
    """A wrapped ``tokenizers.Tokenizer`` with taskmoe's special tokens and chat template."""

    def __init__(self, backend: HFTokenizer) -> None:
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            backend.add_special_tokens(missing)
        self._tok = backend
        self._plain: HFTokenizer | None = None  # same vocabulary, special strings read as plain text
        self.special_ids: dict[str, int] = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}

    # -- construction --------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        show_progress: bool = True,
        length: int | None = None,
    ) -> "Tokenizer":
        """Train byte-level BPE on ``texts``; specials get ids 0..11, then the 256 bytes, then merges.

        Deterministic for the same texts in the same order. ``length`` (number of texts) only
        feeds the progress bar.
        """
        from tokenizers import decoders, models, pre_tokenizers, trainers

        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise DataError(f"vocab_size must be at least {floor} (12 special tokens + 256 bytes), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok)

    @classmethod
    def beside(cls, folder: str | Path) -> "Tokenizer":
        """The tokenizer a model folder was saved with: ``folder/tokenizer.json``, else the one
        beside the folder (``folder/../tokenizer.json``, the layout of a run folder)."""
        folder = Path(folder)
        candidates = [folder / TOKENIZER_FILE, folder.parent / TOKENIZER_FILE]
        for c in candidates:
            if c.is_file():
                return cls.load(c)
        raise DataError(f"{folder}: no {TOKENIZER_FILE} inside or beside it (looked at {[str(c) for c in candidates]})")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a ``tokenizer.json`` (ours or any Hugging Face one); a folder means its tokenizer.json."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_str(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read tokenizer ({e})") from e
        except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from e

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` atomically (a folder means ``folder/tokenizer.json``)."""
        path = Path(path)
        if path.is_dir() or path.suffix == "":
            path = path / TOKENIZER_FILE
        return atomic_write_text(path, self._tok.to_str(pretty=True))

    def to_str(self) -> str:
        """The tokenizer.json content."""
        return self._tok.to_str()

    # -- ids -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the id space (base vocabulary plus added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    pad_id = _special_id("<|pad|>")
    bos_id = _special_id("<|bos|>")
    eos_id = _special_id("<|eos|>")
    unk_id = _special_id("<|unk|>")

    def token_id(self, token: str) -> int:
        """Id of a token string (e.g. a special token); DataError if absent."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise DataError(f"token {token!r} is not in the vocabulary")
        return i

    # -- encode / decode -----------------------------------------------------------------
    def _plain_backend(self) -> HFTokenizer:
        if self._plain is None:
            self._plain = HFTokenizer.from_str(self._tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added). With ``allow_special=False`` a special-token
        string in ``text`` is encoded as ordinary bytes."""
        backend = self._tok if allow_special else self._plain_backend()
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts (parallel inside ``tokenizers``)."""
        backend = self._tok if allow_special else self._plain_backend()
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: ``<|bos|>`` + ``text`` as plain bytes (every taskmoe sequence starts with BOS)."""
        return [self.bos_id, *self.encode(text, allow_special=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens are kept as their strings unless ``skip_special``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # -- chat ----------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """``<|bos|>`` + ``<|role|>content<|eos|>`` per message (+ ``<|assistant|>`` if asked).

        >>> # [{"role": "user", "content": "Hi"}] -> "<|bos|><|user|>Hi<|eos|><|assistant|>"
        """
        _check_messages(messages)
        parts = ["<|bos|>"]
        parts += [f"<|{m['role']}|>{m['content']}<|eos|>" for m in messages]
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of :meth:`apply_chat_template`, with contents encoded as plain text (no forged specials)."""
        _check_messages(messages)
        ids = [self.bos_id]
        contents = self.encode_batch([m["content"] for m in messages], allow_special=False)
        for m, content in zip(messages, contents):
            ids += [self.special_ids[f"<|{m['role']}|>"], *content, self.eos_id]
        if add_generation_prompt:
            ids.append(self.special_ids["<|assistant|>"])
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def tokenizer_meta(tok: Tokenizer) -> dict[str, object]:
    """A JSON-able summary (vocab size and special ids) for manifests."""
    return {"vocab_size": tok.vocab_size, "special_ids": dict(tok.special_ids)}
