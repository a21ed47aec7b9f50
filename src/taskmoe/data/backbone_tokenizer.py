"""``BackboneTokenizer``: a pretrained backbone's own ``tokenizer.json`` and chat template behind our tokenizer protocol.

A backbone folder (see :mod:`taskmoe.models.backbones`) holds the Hugging Face tokenizer files:
``tokenizer.json`` (read with ``tokenizers``, no ``transformers`` import) and
``tokenizer_config.json`` (special-token strings, ``chat_template``; a ``chat_template.jinja``
beside it wins, as in transformers 5). :class:`BackboneTokenizer` subclasses
:class:`~taskmoe.data.tokenizer.Tokenizer`, so ``encode``/``decode``/``encode_batch``/``token_id``
and ``bos_id``/``eos_id``/``pad_id`` work unchanged for generate, chat, serve and eval.

Design choices:

- **The vocabulary is the backbone's, untouched.** Unlike our own tokenizer, none of taskmoe's
  special tokens are appended (the model's embedding has exactly ``vocab_size`` rows);
  ``special_ids`` maps ``<|bos|>``/``<|eos|>``/``<|pad|>``/``<|unk|>`` to the backbone's own
  tokens named in ``tokenizer_config.json`` (pad falls back to eos).
- **The chat template is rendered as transformers renders it**: a sandboxed Jinja environment
  with ``trim_blocks``/``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now`` and
  a non-escaping ``tojson``, called with ``messages``, ``add_generation_prompt`` and the special
  token strings.
- **No forged specials from message text**: :meth:`encode_chat` renders the template around
  placeholders, encodes the template's own text with special tokens and each message content as
  plain text. Splits fall at template boundaries (specials, newlines), where byte-level BPE does not
  merge across anyway, so the ids equal transformers' ``apply_chat_template(tokenize=True)`` (tested);
  a template that rewrites contents (so a placeholder is lost) is encoded from its rendered string.
- **Prompts**: :meth:`encode_prompt` is plain text after the backbone's BOS only when its
  ``tokenizer.json`` post-processor adds one (Llama 2/3 do, SmolLM2 does not), as transformers'
  ``tokenizer(text)`` does.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import Tokenizer as HFTokenizer

from taskmoe.data.tokenizer import TOKENIZER_FILE, Tokenizer
from taskmoe.errors import DataError
from taskmoe.io import atomic_write_json, atomic_write_text

__all__ = ["BackboneTokenizer", "TOKENIZER_CONFIG_FILE", "CHAT_TEMPLATE_FILE", "is_backbone_tokenizer_dir", "load_tokenizer"]

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_ROLE_KEYS = {"<|bos|>": "bos_token", "<|eos|>": "eos_token", "<|pad|>": "pad_token", "<|unk|>": "unk_token"}
_MARK = "\ue000{}\ue001"  # private-use code points: a placeholder no template or text produces
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


def is_backbone_tokenizer_dir(folder: str | Path) -> bool:
    """True when ``folder`` holds a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json)."""
    folder = Path(folder)
    return (folder / TOKENIZER_FILE).is_file() and (folder / TOKENIZER_CONFIG_FILE).is_file()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at ``path`` (a tokenizer.json or its folder): a :class:`BackboneTokenizer` when a
    ``tokenizer_config.json`` lies beside it (a Hugging Face tokenizer), else our own :class:`Tokenizer`."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if is_backbone_tokenizer_dir(folder) and (path.is_dir() or path.name == TOKENIZER_FILE):
        return BackboneTokenizer.load(folder)
    return Tokenizer.load(path)


def _token_str(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _render(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
            specials: Mapping[str, str]) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **specials)
    except TemplateError as e:
        raise DataError(f"chat template failed: {e}") from e


class BackboneTokenizer(Tokenizer):
    """A backbone's Hugging Face tokenizer (see the module docstring)."""

    def __init__(self, backend: HFTokenizer, config: Mapping[str, Any] | None = None,
                 chat_template: str | None = None) -> None:
        self._tok = backend
        self._plain = None
        self.config = dict(config or {})
        self.chat_template = chat_template if chat_template is not None else self.config.get("chat_template")
        self.special_tokens: dict[str, str] = {}
        self.special_ids: dict[str, int] = {}
        for ours, key in _ROLE_KEYS.items():
            s = _token_str(self.config.get(key))
            if s is not None and backend.token_to_id(s) is not None:
                self.special_tokens[key] = s
                self.special_ids[ours] = backend.token_to_id(s)
        if "<|eos|>" not in self.special_ids:
            raise DataError(f"backbone tokenizer: {TOKENIZER_CONFIG_FILE} names no eos_token in the vocabulary "
                            f"(got {self.config.get('eos_token')!r})")
        self.special_ids.setdefault("<|pad|>", self.special_ids["<|eos|>"])
        self.special_ids.setdefault("<|bos|>", self.special_ids["<|eos|>"])

    @classmethod
    def load(cls, path: str | Path) -> "BackboneTokenizer":
        """Read ``folder/tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``)."""
        folder = Path(path)
        folder = folder.parent if folder.is_file() else folder
        tj, cj, tmpl = folder / TOKENIZER_FILE, folder / TOKENIZER_CONFIG_FILE, folder / CHAT_TEMPLATE_FILE
        try:
            backend = HFTokenizer.from_str(tj.read_text(encoding="utf-8"))
        except OSError as e:
            raise DataError(f"{tj}: cannot read tokenizer ({e})") from e
        except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
            raise DataError(f"{tj}: not a valid tokenizer.json ({e})") from e
        try:
            config = json.loads(cj.read_text(encoding="utf-8"))
            template = tmpl.read_text(encoding="utf-8") if tmpl.is_file() else None
        except (OSError, ValueError) as e:
            raise DataError(f"{cj}: cannot read tokenizer config ({e})") from e
        if not isinstance(config, dict):
            raise DataError(f"{cj}: expected a JSON object")
        return cls(backend, config, template)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into folder ``path``."""
        folder = Path(path)
        folder = folder.parent if folder.suffix == ".json" else folder
        atomic_write_json(folder / TOKENIZER_CONFIG_FILE, {**self.config, "chat_template": self.chat_template})
        return atomic_write_text(folder / TOKENIZER_FILE, self._tok.to_str(pretty=True))

    # -- prompts and chat ----------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Plain ``text`` with the special tokens the tokenizer's post-processor adds (e.g. Llama's BOS)."""
        return self._plain_backend().encode(text, add_special_tokens=True).ids

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The backbone's chat template rendered for ``messages`` (DataError if it has none)."""
        _check_shape(messages)
        if not self.chat_template:
            raise DataError(f"this backbone tokenizer has no chat_template ({TOKENIZER_CONFIG_FILE} / "
                            f"{CHAT_TEMPLATE_FILE})")
        return _render(self.chat_template, messages, add_generation_prompt, self.special_tokens)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered template; message contents encoded as plain text (no forged specials)."""
        _check_shape(messages)
        marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
        text = self.apply_chat_template(marked, add_generation_prompt)
        pieces = _MARK_RE.split(text)  # template, index, template, index, ..., template
        if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))):
            return self.encode(self.apply_chat_template(messages, add_generation_prompt))
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                ids += self.encode(messages[int(piece)]["content"], allow_special=False)
            elif piece:
                ids += self.encode(piece)
        return ids

    def __repr__(self) -> str:
        return f"BackboneTokenizer(vocab_size={self.vocab_size}, chat_template={bool(self.chat_template)})"


def _check_shape(messages: Sequence[Mapping[str, str]]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"chat message {i}: expected a dict with string 'role' and 'content', got {m!r:.80}")
