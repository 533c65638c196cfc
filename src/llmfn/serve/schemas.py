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
# What a handler checks itself, with a message of its own (an empty prompt is "the prompt is empty"),
# shown in the OpenAPI document only: extra_json_schema is not enforced when decoding.
NonEmptyText = Annotated[str, Meta(extra_json_schema={"minLength": 1})]
NonEmptyIds = Annotated[list[Annotated[int, Meta(ge=0)]], Meta(extra_json_schema={"minItems": 1})]


class StreamOptions(Struct, frozen=True):
    include_usage: bool = False


class PromptTokensDetails(Struct):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


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


class JsonSchemaFormat(Struct, frozen=True):
    name: str | None = None
    schema: dict | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Struct, frozen=True):
    """OpenAI's response_format: "text", "json_object" or "json_schema" (with json_schema.schema)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


# How many choices a request may ask for (n): each is a generation of its own.
MaxChoices = Annotated[int, Meta(ge=1, le=16)]
# OpenAI's logit_bias: token id (a JSON object's keys are strings) -> bias in [-100, 100].
LogitBias = dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]]


class GenerationFields(SamplingFields, kw_only=True, frozen=True):
    """What chat and text completions both take. Unset sampling fields take the model's defaults
    (generation_config.json, or the settings recorded beside a built-in alias), then llmfn.sampling's.
    At most one constraint: response_format or one of vLLM's guided_* fields."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    stop: str | list[str] | None = None
    n: MaxChoices | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: LogitBias | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Meta(extra_json_schema={"minItems": 1})] | None = None
    guided_grammar: str | None = None


# ---------------------------------------------------------------------------------------------- chat


class ContentPart(Struct, frozen=True):
    """A text part ({"type": "text", "text": ...}); other part types are rejected (by message_dict,
    which names the part; the OpenAPI document says so)."""

    type: Annotated[str, Meta(extra_json_schema={"enum": ["text"]})]
    text: str | None = None


class FunctionCall(Struct, frozen=True):
    name: str
    arguments: str = "{}"  # JSON text of an object


class ToolCall(Struct, frozen=True):
    """A call the assistant made, as it comes back in the history."""

    function: FunctionCall
    id: str | None = None
    type: Literal["function"] = "function"


Content = str | list[ContentPart]


class _Message(Struct, frozen=True, kw_only=True, tag_field="role"):
    """A chat message: one struct per role (the "role" field is its tag), as only an assistant's
    content may be missing (when it makes tool calls)."""

    name: str | None = None

    @property
    def role(self) -> str:
        return self.__struct_config__.tag


class SystemMessage(_Message, frozen=True, kw_only=True, tag="system"):
    content: Content


class DeveloperMessage(_Message, frozen=True, kw_only=True, tag="developer"):
    content: Content


class UserMessage(_Message, frozen=True, kw_only=True, tag="user"):
    content: Content


class AssistantTurn(_Message, frozen=True, kw_only=True, tag="assistant"):
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Message, frozen=True, kw_only=True, tag="tool"):
    content: Content
    tool_call_id: str | None = None


ChatMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantTurn | ToolMessage


class FunctionDef(Struct, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Struct, frozen=True):
    function: FunctionDef
    type: Literal["function"] = "function"


class NamedFunction(Struct, frozen=True):
    name: str


class NamedToolChoice(Struct, frozen=True):
    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(GenerationFields, frozen=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None


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


class ToolCallOut(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class AssistantMessage(Struct, omit_defaults=True):
    role: str
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] = []


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


class FunctionDelta(Struct, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallDelta(Struct, omit_defaults=True):
    """One piece of a streamed call: the first carries id, type and name, the rest argument text."""

    index: int
    function: FunctionDelta
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET


class ChatDelta(Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


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

# a string, a list of strings, a token id list, or a list of token id lists (checked by the app: not a
# mix of these; the OpenAPI document lists the four)
Prompt = NonEmptyText | list[str | int | list[int]]


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


# ---------------------------------------------------------------------------------------------- responses


class ResponsesRequest(SamplingFields, kw_only=True, frozen=True):
    """OpenAI's Responses API, one model turn: input items and tools are checked where they are read
    (llmfn.serve.responses), as their shapes vary by type."""

    input: str | list[dict]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    stream: bool | None = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict | None = None
    user: str | None = None


class ResponseObject(Struct):
    """The answer of /v1/responses (documentation: the route writes it as OpenAI's `response`)."""

    id: str
    created_at: float
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: list[dict]
    usage: dict | None
    object: str = "response"


class ResponseEvent(Struct):
    """One event of a streamed /v1/responses turn: response.created, response.output_text.delta, ...,
    response.completed (documentation: the route writes them as dicts, with the fields of each type)."""

    type: str
    sequence_number: int


# ---------------------------------------------------------------------------------------------- embeddings


class EmbeddingRequest(Struct, frozen=True):
    input: Prompt
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1, description="vLLM's: cut each input to this many "
        "tokens, the special ones included and always kept (-1: the model's limit); unset, a longer input is a "
        "400")] | None = None  # fmt: skip


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
    "ResponsesRequest": ResponsesRequest,
    "EmbeddingRequest": EmbeddingRequest,
    "TokenizeRequest": TokenizeRequest,
    "DetokenizeRequest": DetokenizeRequest,
}
RESPONSES = (
    ChatCompletion, ChatCompletionChunk, Completion, ResponseObject, ResponseEvent, EmbeddingList, ModelList, ModelCard, TokenizeResponse,
    DetokenizeResponse, Health, ErrorResponse,
)  # fmt: skip

# What each streamed route's events carry (documentation: /v1/responses writes its events as dicts).
STREAMED = {"/v1/chat/completions": ChatCompletionChunk, "/v1/completions": Completion, "/v1/responses": ResponseEvent}

encoder = msgspec.json.Encoder()
