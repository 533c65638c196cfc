"""Every wire schema of the HTTP API, as msgspec Structs (OpenAI's shapes, plus vLLM's tokenize).

Requests are decoded straight into these types, so a wrong type or an out-of-range value is a
msgspec.ValidationError naming the field (`$.temperature`); the app turns it into a 400. Unknown
request fields are ignored, as OpenAI-compatible servers do. The OpenAPI document is generated
from this module (llmfn.serve.openapi).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from llmfn.sampling import KNOBS, Knob

# ---------------------------------------------------------------------------------------------- shared

MaxTokens = Annotated[int, Meta(ge=1)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
TokenIds = list[Annotated[int, Meta(ge=0)]]


class StreamOptions(Struct, frozen=True):
    include_usage: bool = False


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct):
    error: ErrorDetail


def _knob_type(knob: Knob):
    """The wire type of a sampling parameter: its KNOBS type and range, its meaning as the description."""
    return Annotated[knob.kind, Meta(ge=knob.ge, gt=knob.gt, le=knob.le, description=knob.help)]


# One optional field per sampling parameter, derived from KNOBS (None: unset). Keyword-only, so that a
# request's required fields may follow these optional ones.
SamplingFields = msgspec.defstruct(
    "SamplingFields", [(name, _knob_type(knob) | None, None) for name, knob in KNOBS.items()],
    kw_only=True, frozen=True, module=__name__,
)  # fmt: skip


class GenerationFields(SamplingFields, kw_only=True, frozen=True):
    """What chat and text completions both take. Unset sampling fields take llmfn.sampling's defaults,
    except temperature: unset means 1, OpenAI's default."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Meta(ge=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


# ---------------------------------------------------------------------------------------------- chat


class ContentPart(Struct, frozen=True):
    """A text part ({"type": "text", "text": ...}); other part types are rejected."""

    type: str
    text: str | None = None


class ChatMessage(Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(Struct, frozen=True):
    type: Literal["text", "json_object", "json_schema"] = "text"


class ChatCompletionRequest(GenerationFields, frozen=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None


class TopLogprob(Struct):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(Struct):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(Struct):
    role: str
    content: str | None
    refusal: None = None


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str = "llmfn"


class ChatDelta(Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str = "llmfn"
    usage: Usage | None | UnsetType = UNSET  # null in every chunk when include_usage, set in the last


# ---------------------------------------------------------------------------------------------- completions

# a string, a list of strings, a token id list, or a list of token id lists (checked by the app)
Prompt = str | list[str | int | list[int]]


class CompletionRequest(GenerationFields, frozen=True):
    prompt: Prompt
    best_of: Annotated[int, Meta(ge=1)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    logprobs: TopLogprobs | None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    system_fingerprint: str = "llmfn"
    usage: Usage | None | UnsetType = UNSET


# ---------------------------------------------------------------------------------------------- embeddings


class EmbeddingRequest(Struct, frozen=True):
    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class Embedding(Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: str = "list"


# ---------------------------------------------------------------------------------------------- models


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str = "llmfn"
    object: str = "model"
    root: str | None = None  # the configured name, for an alias
    type: str | None = None  # "causal-lm" or "embedding"
    max_model_len: int | None = None


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


# ---------------------------------------------------------------------------------------------- tokenizer (vLLM's shapes)


class TokenizeRequest(Struct, frozen=True):
    """Either `prompt` (plain text) or `messages` (rendered with the model's chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(Struct, frozen=True):
    tokens: TokenIds
    model: str | None = None


class DetokenizeResponse(Struct):
    prompt: str


# ---------------------------------------------------------------------------------------------- health


class Health(Struct, omit_defaults=True):
    status: Literal["loading", "ok", "error"]
    models: list[str] = []
    error: str | None = None


REQUESTS = {
    "ChatCompletionRequest": ChatCompletionRequest,
    "CompletionRequest": CompletionRequest,
    "EmbeddingRequest": EmbeddingRequest,
    "TokenizeRequest": TokenizeRequest,
    "DetokenizeRequest": DetokenizeRequest,
}
RESPONSES = (
    ChatCompletion, ChatCompletionChunk, Completion, EmbeddingList, ModelList, ModelCard, TokenizeResponse,
    DetokenizeResponse, Health, ErrorResponse,
)  # fmt: skip

encoder = msgspec.json.Encoder()
