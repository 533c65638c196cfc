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

# ---------------------------------------------------------------------------------------------- shared

Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="0 is greedy; OpenAI's default is 1")]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1, description="0 or -1: no limit")]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
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


class ChatCompletionRequest(Struct, frozen=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    model: str | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    n: Annotated[int, Meta(ge=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    user: str | None = None


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


class CompletionRequest(Struct, frozen=True):
    prompt: Prompt
    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    n: Annotated[int, Meta(ge=1)] | None = None
    best_of: Annotated[int, Meta(ge=1)] | None = None
    echo: bool | None = False
    suffix: str | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


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
