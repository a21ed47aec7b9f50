"""Pydantic models of the OpenAI-compatible requests and responses the server speaks.

Requests follow the OpenAI Chat Completions and (legacy) Completions APIs for the fields that
make sense here (``model``, ``messages``/``prompt``, ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``n``, ``stream``, ``stream_options``, ``seed``, ``user``), plus one extension:

- ``taskmoe: {"trace": true}`` in a request asks for the routing trace; the response then carries
  ``taskmoe: {"choices": [{"index", "route", "generation"}]}`` (the routing decision made before
  batching and, when the backend has one, its per-row generation trace). The official ``openai``
  client sends it with ``extra_body={"taskmoe": {"trace": True}}`` and exposes it as
  ``response.taskmoe``.

Design choices: every request model is **strict** (``strict=True``: ``max_tokens: true``,
``stream: "yes"`` or ``n: 1.0`` are schema errors, not coerced) and rejects unknown fields
(``extra="forbid"``), so a parameter this
server does not implement (``logprobs``, ``tools``, penalties, ...) is an error naming the field
rather than silently ignored; there is no field that names a file, and ``model`` is only ever
matched against the served model ids. :func:`request_models` derives the request models of one
server from its :class:`~taskmoe.serving.limits.Limits`, so limits JSON Schema can express
(``max_tokens``, ``n``, stop sequences, message and prompt counts) are in ``/openapi.json`` and
answered 422 like any schema violation; the rest (prompt length in tokens, body size, prompts x n)
are checked by the app. Every request string is :data:`Text`: it must be encodable Unicode (a
lone UTF-16 surrogate such as ``"\ud800"`` is answered 400 naming the field, see
:mod:`taskmoe.serving.errors`), and prompts and message texts are non-empty (``minLength: 1``),
so the schema and the handlers agree on what is accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from taskmoe.serving.limits import Limits


UNENCODABLE = "unencodable_text"
"""The pydantic error type of a request string that is not encodable Unicode (answered 400)."""


def encodable(text: str) -> str:
    """``text`` unchanged if it encodes as UTF-8; else a validation error (lone surrogates do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(UNENCODABLE, "text is not valid Unicode ({reason} at index {index})",
                                  {"reason": e.reason, "index": e.start}) from None
    return text


def integral(v: Any) -> Any:
    """JSON Schema counts ``1.0`` as an integer: pass it on as ``1`` (``true``, ``"1"``, ``1.5`` stay errors)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(integral)]
"""A request integer: a JSON integer (``1`` or ``1.0``), never a boolean or a string."""


def int_in(lo: int, hi: int | None = None) -> Any:
    """:data:`Int` within ``[lo, hi]``, the bounds in the JSON Schema (``minimum``/``maximum``)."""
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(integral)]

Text = Annotated[str, AfterValidator(encodable)]
"""A request string: any encodable Unicode text."""
NonEmptyText = Annotated[Text, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


# ----------------------------------------------------------------------------- requests
class TaskmoeOptions(_Strict):
    """taskmoe's request extension."""

    trace: bool = Field(False, description="return the routing trace in the response's `taskmoe` field")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with token usage")


class TextPart(_Strict):
    type: Literal["text"]
    text: NonEmptyText


class ImageURL(_Strict):
    url: str = Field(description="data:image/png;base64,... (or image/jpeg); remote URLs are not fetched")
    detail: Optional[Literal["auto", "low", "high"]] = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str = Field(description="base64 of a PCM wav file")
    format: Literal["wav"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[NonEmptyText, Annotated[list[TextPart], Field(min_length=1)]]
    name: Optional[Text] = Field(None, max_length=256)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content if isinstance(p, TextPart))

    def has_media(self) -> bool:
        return not isinstance(self.content, str) and any(not isinstance(p, TextPart) for p in self.content)


class MediaChatMessage(ChatMessage):
    """A message of a server whose model takes images or audio (``image_url`` / ``input_audio`` parts)."""

    content: Union[NonEmptyText, Annotated[list[Union[TextPart, ImagePart, AudioPart]], Field(min_length=1)]]


class _GenerationFields(_Strict):
    model: Text = Field(..., min_length=1, max_length=256, description="one of the ids listed by GET /v1/models")
    max_tokens: Optional[int_in(1)] = Field(None, description="most tokens to generate per choice")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 is greedy decoding")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass")
    n: Optional[int_in(1)] = Field(None, description="choices per prompt")
    stop: Optional[Union[Text, list[Text]]] = Field(None, description="up to 4 sequences where generation stops")
    stream: Optional[bool] = Field(False, description="stream server-sent events")
    stream_options: Optional[StreamOptions] = None
    seed: Optional[Int] = Field(None, description="makes sampling reproducible (any integer; used modulo 2**63)")
    user: Optional[Text] = Field(None, max_length=256)
    taskmoe: Optional[TaskmoeOptions] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def wants_trace(self) -> bool:
        return bool(self.taskmoe and self.taskmoe.trace)

    @property
    def wants_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int_in(1)] = Field(None, description="newer name of max_tokens")

    def token_budget(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_GenerationFields):
    prompt: Union[NonEmptyText, list[NonEmptyText]] = Field(..., description="a prompt, or a list of prompts (n choices each)")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def token_budget(self) -> Optional[int]:
        return self.max_tokens


def request_models(limits: Limits, media: bool = False) -> tuple[type[ChatCompletionRequest], type[CompletionRequest]]:
    """The chat and completion request models with ``limits`` written into their schema (``media``:
    chat messages may hold image/audio parts -- only for a backend that takes them, so every
    schema-valid request of a text server is one it can answer)."""
    stop_str = Annotated[Text, Field(max_length=limits.max_stop_chars)]
    common: dict[str, Any] = {
        "max_tokens": (Optional[int_in(1, limits.max_max_tokens)], Field(None, description="most tokens to generate per choice")),
        "n": (Optional[int_in(1, limits.max_n)], Field(None, description="choices per prompt")),
        "stop": (Optional[Union[stop_str, Annotated[list[stop_str], Field(max_length=limits.max_stop)]]],
                 Field(None, description=f"up to {limits.max_stop} sequences where generation stops")),
    }
    chat = create_model(
        "ChatCompletionRequest", __base__=ChatCompletionRequest, __module__=__name__,
        messages=(list[MediaChatMessage if media else ChatMessage], Field(..., min_length=1, max_length=limits.max_messages)),
        max_completion_tokens=(Optional[int_in(1, limits.max_max_tokens)], Field(None,
                                                     description="newer name of max_tokens")),
        **common,
    )
    completion = create_model(
        "CompletionRequest", __base__=CompletionRequest, __module__=__name__,
        prompt=(Union[NonEmptyText, Annotated[list[NonEmptyText], Field(min_length=1, max_length=limits.max_n)]],
                Field(..., description="a prompt, or a list of prompts (n choices each)")),
        **common,
    )
    return chat, completion


# ---------------------------------------------------------------------------- responses
FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChoiceTrace(BaseModel):
    index: int
    route: dict[str, Any]
    generation: Optional[dict[str, Any]] = None


class TaskmoeInfo(BaseModel):
    """taskmoe's response extension (present only when the request asked for the trace)."""

    choices: list[ChoiceTrace]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    taskmoe: Optional[TaskmoeInfo] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Optional[FinishReason] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    taskmoe: Optional[TaskmoeInfo] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[FinishReason] = None
    logprobs: None = None


class Completion(BaseModel):
    """A completion, or (``object`` stays ``text_completion``) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    taskmoe: Optional[TaskmoeInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "taskmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ComponentStatus(BaseModel):
    """A served component (an expert, an adapter, a model) that failed, and why."""

    component: str
    error: str


class Health(BaseModel):
    """``ok``, or ``degraded`` when a component failed (requests that need it get 503 naming it)."""

    status: Literal["ok", "degraded"] = "ok"
    models: list[str]
    queue_rows: int
    running_rows: int
    backlog_tokens: int = 0
    backlog_s: Optional[float] = Field(None, description="predicted seconds until the admitted work is done "
                                       "(admission by work; null before a decode step was timed)")
    work_tokens_per_s: Optional[float] = Field(None, description="measured throughput, work tokens per busy second "
                                               "(EWMA; shown only: admission predicts seconds)")
    rates: dict[str, Optional[float]] = Field(default_factory=dict, description="the measured rates admission "
                                              "predicts with: prefill s per prompt token, decode round s per batch "
                                              "and per row, decode rounds per answer token")
    failed: list[ComponentStatus] = Field(default_factory=list)
