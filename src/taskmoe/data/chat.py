"""Chat rendering with an assistant mask: the one protocol SFT, DPO and evaluation use for any tokenizer.

:func:`render_chat` turns a list of ``{"role", "content"}`` messages into token ids and a boolean
*assistant mask* (True on the tokens a chat model produces: each assistant turn's content and its
end-of-turn marker, never the role header), plus the ``[start, end)`` span of each assistant turn.

The protocol (:class:`ChatRenderer`): a tokenizer that has ``render_chat(messages) -> RenderedChat``
is used as is. Otherwise the mask is computed **by rendering prefixes** through the tokenizer's own
template, so any template works without knowing its layout:

- ``P_i = ids(messages[:i], add_generation_prompt=True)`` (the prompt the model sees before
  assistant turn ``i``) and ``F_i = ids(messages[:i+1], add_generation_prompt=False)``;
- turn ``i`` is ``full[len(P_i):len(F_i)]``, which requires ``P_i`` to be a prefix of ``F_i`` and
  ``F_i`` a prefix of the full rendering (a template that rewrites earlier turns, e.g. one that
  drops past reasoning, breaks this and gets a :class:`~taskmoe.errors.DataError` naming the
  turn: give such a tokenizer its own ``render_chat``).

``ids(messages, add_generation_prompt)`` comes from ``encode_chat`` (taskmoe's
:class:`~taskmoe.data.tokenizer.Tokenizer`: ``<|bos|><|role|>content<|eos|>...``, contents
encoded as plain text) or from a Hugging Face tokenizer's Jinja ``apply_chat_template`` (the
backbone's tokenizer, e.g. SmolLM2's ``<|im_start|>assistant\\n...<|im_end|>\\n``).
:func:`prompt_ids` is the generation prompt alone (what inference and evaluation feed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from taskmoe.errors import DataError

Messages = Sequence[Mapping[str, str]]
IdsFn = Callable[[Messages, bool], list[int]]


@dataclass(frozen=True)
class RenderedChat:
    """Token ids of a chat, the assistant mask (same length) and each assistant turn's ``[start, end)``."""

    ids: list[int]
    assistant_mask: list[bool]
    spans: list[tuple[int, int]]


class ChatRenderer(Protocol):
    """A tokenizer that renders chats itself (else :func:`render_chat` renders prefixes)."""

    def render_chat(self, messages: Messages) -> RenderedChat: ...


def chat_ids_fn(tokenizer: Any) -> IdsFn:
    """``ids(messages, add_generation_prompt)`` for ``tokenizer`` (taskmoe's ``encode_chat`` or HF's template)."""
    if hasattr(tokenizer, "encode_chat"):
        return lambda m, g: list(tokenizer.encode_chat(list(m), add_generation_prompt=g))
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):

        def hf(m: Messages, g: bool) -> list[int]:
            out = tokenizer.apply_chat_template([dict(x) for x in m], tokenize=True, add_generation_prompt=g)
            ids = out["input_ids"] if isinstance(out, Mapping) else out
            return [int(i) for i in ids]

        return hf
    raise DataError(f"{type(tokenizer).__name__}: no chat template (needs encode_chat, a chat_template, or render_chat)")


def _check(messages: Messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"a chat must be a non-empty list of {{'role', 'content'}} messages, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"chat message {i}: expected {{'role': str, 'content': str}}, got {m!r:.80}")


def render_by_prefixes(ids_fn: IdsFn, messages: Messages) -> RenderedChat:
    """The prefix construction of the module docstring, for any ``ids_fn``."""
    _check(messages)
    full = ids_fn(messages, False)
    mask = [False] * len(full)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = ids_fn(messages[:i], True) if i else []
        upto = ids_fn(messages[: i + 1], False)
        if upto[: len(before)] != before or full[: len(upto)] != upto:
            raise DataError(f"chat template is not prefix-stable at message {i} (assistant): rendering the chat up to "
                            "this turn does not extend the rendering before it; give the tokenizer a render_chat method")
        spans.append((len(before), len(upto)))
        for t in range(len(before), len(upto)):
            mask[t] = True
    return RenderedChat(full, mask, spans)


def render_chat(tokenizer: Any, messages: Messages) -> RenderedChat:
    """Ids + assistant mask of ``messages`` under ``tokenizer``'s chat template (module docstring)."""
    if hasattr(tokenizer, "render_chat"):
        return tokenizer.render_chat(messages)
    return render_by_prefixes(chat_ids_fn(tokenizer), messages)


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """The generation prompt: ``messages`` rendered with the open assistant turn at the end."""
    _check(messages)
    return chat_ids_fn(tokenizer)(messages, True)


def pad_id_of(tokenizer: Any) -> int:
    """The padding id: ``pad_id`` (taskmoe), else ``pad_token_id``, else ``eos_token_id`` (HF)."""
    for name in ("pad_id", "pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    raise DataError(f"{type(tokenizer).__name__}: no pad, pad_token_id or eos_token_id to pad batches with")
