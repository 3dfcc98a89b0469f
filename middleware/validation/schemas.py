"""Pydantic v2 models of the request bodies the gateway accepts.

`ChatCompletionRequest` follows the OpenAI spec's ``CreateChatCompletionRequest``
and `ResponsesRequest` its ``CreateResponse``, as far as the gateway can serve
them. They are *validators only*: the validation unit checks the parsed body
against them and throws the result away, so the client's bytes are forwarded
untouched. Hence the choices below:

- strict mode everywhere (``"temperature": "1"`` or ``true`` for a number is an
  error, as at OpenAI) and ranges/shapes of every known field are checked;
- unknown fields are ignored, at the top level and inside objects, so fields
  OpenAI adds later keep working;
- tagged unions (message ``role``, part/tool ``type``) go through `tagged()`,
  which reports a missing or unknown tag with our own error types, so the
  validation unit can name the tag field and list the supported values;
- image, audio and file inputs validate into errors of type
  ``unsupported_image_input`` / ``unsupported_audio_input`` /
  ``unsupported_file_input`` wherever they may appear.

Legacy ``functions``/``function_call`` and ``role: "function"`` messages are
valid here; the legacy_functions unit converts them later in the pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

# Error types of our own (pydantic's are e.g. `missing`, `string_type`).
MISSING_FIELD = "missing_field"  # ctx: field
BAD_TAG = "bad_tag"  # ctx: field, expected, got
UNSUPPORTED_IMAGE = "unsupported_image_input"
UNSUPPORTED_AUDIO = "unsupported_audio_input"
UNSUPPORTED_FILE = "unsupported_file_input"
UNSUPPORTED = frozenset({UNSUPPORTED_IMAGE, UNSUPPORTED_AUDIO, UNSUPPORTED_FILE})

# Tag names used inside pydantic's error locations; they contain "=" so they
# can never be mistaken for a key of the client's JSON (see validation.py).
_NOT_OBJECT, _NO_TAG, _BAD_TAG, _OTHER = "=object", "=missing", "=invalid", "=other"


class Strict(BaseModel):
    """Strict types, unknown fields ignored (validation only; the output is discarded)."""

    model_config = ConfigDict(strict=True, extra="ignore", cache_strings=False)


def tagged(field: str, choices: dict[str, Any], *, default: str | None = None, other: Any = None) -> Any:
    """A union picked by the string value of `field` (e.g. ``type``, ``role``).

    `default` is the tag assumed when the field is absent or null (the
    Anthropic SDK types `tools[].type` as optional); `other`, if given,
    validates every unlisted tag (otherwise those are a `BAD_TAG` error).
    """
    expected = tuple(choices)

    def pick(value: Any) -> str:
        if not isinstance(value, dict):
            return _NOT_OBJECT
        tag = value.get(field)
        if tag is None:
            tag = default
        if tag is None:
            return _NO_TAG
        if isinstance(tag, str) and tag in choices:
            return f"{field}={tag}"
        return _OTHER if other is not None and isinstance(tag, str) else _BAD_TAG

    def missing(value: Any) -> Any:
        raise PydanticCustomError(MISSING_FIELD, "missing", {"field": field})

    def bad(value: Any) -> Any:
        raise PydanticCustomError(BAD_TAG, "invalid tag", {"field": field, "expected": expected, "got": value.get(field)})

    members: list[Any] = [Annotated[model, Tag(f"{field}={tag}")] for tag, model in choices.items()]
    members += [
        Annotated[dict, Tag(_NOT_OBJECT)],  # strict dict: reports "expected an object"
        Annotated[Any, BeforeValidator(missing), Tag(_NO_TAG)],
        Annotated[Any, BeforeValidator(bad), Tag(_BAD_TAG)],
    ]
    if other is not None:
        members.append(Annotated[other, Tag(_OTHER)])
    return Annotated[Union[tuple(members)], Discriminator(pick), _TaggedJsonSchema(field, choices, default, other is not None)]


class _TaggedJsonSchema:
    """The JSON schema of a `tagged()` union, for /openapi.json: one branch per accepted tag.

    Each branch pins its tag (``"role": {"const": "user"}``) so the branches
    exclude each other as `oneOf` requires; the members that only shape errors
    (not an object, missing or unknown tag) and the refused media types are left
    out, since no valid request uses them.
    """

    def __init__(self, field: str, choices: dict[str, Any], default: str | None, has_other: bool) -> None:
        self.field, self.choices, self.default, self.has_other = field, choices, default, has_other

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        branches = core_schema["choices"]
        one_of = []
        for tag, model in self.choices.items():
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                continue  # a refused media type
            pinned = {"type": "object", "properties": {self.field: {"const": tag}}}
            if tag != self.default:
                pinned["required"] = [self.field]
            one_of.append({"allOf": [handler(branches[f"{self.field}={tag}"]), pinned]})
        if self.has_other:
            others = {"type": "object", "required": [self.field],
                      "properties": {self.field: {"type": "string", "not": {"enum": list(self.choices)}}}}
            one_of.append({"allOf": [handler(branches[_OTHER]), others]})
        return {"oneOf": one_of}


def rejected(code: str, kind: str) -> Any:
    """A part type the gateway refuses; the error message is a sentence that ends with the code."""
    message = f"{kind} inputs are not supported by this gateway ({code})."

    def reject(value: Any) -> Any:
        raise PydanticCustomError(code, message)

    return Annotated[Any, BeforeValidator(reject)]


Image = rejected(UNSUPPORTED_IMAGE, "Image")
Audio = rejected(UNSUPPORTED_AUDIO, "Audio")
File = rejected(UNSUPPORTED_FILE, "File")
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
PositiveInt = Annotated[int, Field(ge=1)]
Metadata = dict[str, str]
JsonObject = dict[str, Any]


# ---------------------------------------------------------------- chat completions


class TextPart(Strict):
    text: str


class RefusalPart(Strict):
    refusal: str


# Media are refused wherever a content array may hold them, whatever the role.
_MEDIA = {"image_url": Image, "input_audio": Audio, "file": File}
if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    UserPart = Any
    AssistantPart = Any
else:
    UserPart = tagged("type", {"text": TextPart, **_MEDIA})
    AssistantPart = tagged("type", {"text": TextPart, "refusal": RefusalPart, **_MEDIA})
UserContent = Union[str, Annotated[list[UserPart], Field(min_length=1)]]
AssistantContent = Union[str, Annotated[list[AssistantPart], Field(min_length=1)]]


class FunctionCall(Strict):
    name: str
    arguments: str


class FunctionToolCall(Strict):
    id: str
    function: FunctionCall


class CustomCall(Strict):
    name: str
    input: str


class CustomToolCall(Strict):
    id: str
    custom: CustomCall


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    ChatToolCall = Any
else:
    ChatToolCall = tagged("type", {"function": FunctionToolCall, "custom": CustomToolCall})


class SystemMessage(Strict):
    content: UserContent
    name: str | None = None


class UserMessage(Strict):
    content: UserContent
    name: str | None = None


class AssistantMessage(Strict):
    content: AssistantContent | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    function_call: FunctionCall | None = None  # legacy

    @model_validator(mode="after")
    def _content_required(self) -> AssistantMessage:
        # OpenAI: content is required unless the message carries a call.
        if self.content is None and not self.tool_calls and self.function_call is None:
            raise PydanticCustomError(MISSING_FIELD, "missing", {"field": "content"})
        return self


class ToolMessage(Strict):
    content: UserContent
    tool_call_id: str


class FunctionMessage(Strict):
    """Legacy result of a `function_call`; converted to a tool message later."""

    name: str
    content: str | None = None


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    ChatMessage = Any
else:
    ChatMessage = tagged(
        "role",
        {
            "system": SystemMessage,
            "developer": SystemMessage,
            "user": UserMessage,
            "assistant": AssistantMessage,
            "tool": ToolMessage,
            "function": FunctionMessage,
        },
    )


class FunctionDefinition(Strict):
    name: FunctionName
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class FunctionTool(Strict):
    function: FunctionDefinition


class CustomDefinition(Strict):
    name: str
    description: str | None = None
    format: JsonObject | None = None


class CustomTool(Strict):
    custom: CustomDefinition


class NamedFunction(Strict):
    name: str


class NamedFunctionChoice(Strict):
    function: NamedFunction


class NamedCustomChoice(Strict):
    custom: NamedFunction


class AllowedTools(Strict):
    mode: Literal["auto", "required"]
    tools: list[JsonObject]


class AllowedToolsChoice(Strict):
    allowed_tools: AllowedTools


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    NamedChatToolChoice = Any
else:
    NamedChatToolChoice = tagged(
        "type", {"function": NamedFunctionChoice, "custom": NamedCustomChoice, "allowed_tools": AllowedToolsChoice}
    )
ChatToolChoice = Union[Literal["none", "auto", "required"], NamedChatToolChoice]


class JsonSchemaFormat(Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: JsonObject | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaResponseFormat(Strict):
    json_schema: JsonSchemaFormat


class Empty(Strict):
    pass


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    ChatResponseFormat = Any
    ChatTool = Any
else:
    ChatResponseFormat = tagged("type", {"text": Empty, "json_object": Empty, "json_schema": JsonSchemaResponseFormat})
    ChatTool = tagged("type", {"function": FunctionTool, "custom": CustomTool})


class ChatCompletionRequest(Strict):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    seed: int | None = None
    user: str | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    response_format: ChatResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ChatToolChoice | None = None
    # Legacy function calling (converted by the legacy_functions unit).
    functions: Annotated[list[FunctionDefinition], Field(min_length=1, max_length=128)] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None


# ---------------------------------------------------------------- Responses


class InputText(Strict):
    text: str


class OutputText(Strict):
    text: str


_RESPONSES_MEDIA = {"input_image": Image, "input_audio": Audio, "input_file": File}
if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    ResponsesPart = Any
    ResponsesOutputPart = Any
else:
    ResponsesPart = tagged(
        "type", {"input_text": InputText, "output_text": OutputText, "refusal": RefusalPart, **_RESPONSES_MEDIA}
    )
    ResponsesOutputPart = tagged("type", {"input_text": InputText, "output_text": OutputText, **_RESPONSES_MEDIA})
ResponsesContent = Union[str, list[ResponsesPart]]


class InputMessage(Strict):
    role: Literal["user", "assistant", "system", "developer"]
    content: ResponsesContent


class FunctionCallItem(Strict):
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(Strict):
    call_id: str
    output: str | list[ResponsesOutputPart]


class SummaryText(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(Strict):
    id: str | None = None
    summary: list[SummaryText]
    encrypted_content: str | None = None


class McpCallItem(Strict):
    """A server tool call an agent model ran (an `mcp_call` output item), sent back as history."""

    id: str
    server_label: str
    name: str
    arguments: str
    output: str | None = None
    error: str | JsonObject | None = None  # OpenAI's is a string, this gateway's an object


class ItemReference(Strict):
    """An item of a stored response, by id (the responses unit resolves it)."""

    id: str


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    InputItem = Any
else:
    InputItem = tagged(
        "type",
        {
            "message": InputMessage,
            "function_call": FunctionCallItem,
            "function_call_output": FunctionCallOutputItem,
            "reasoning": ReasoningItem,
            "mcp_call": McpCallItem,
            "item_reference": ItemReference,
        },
        default="message",  # `{"role": "user", "content": "hi"}` is an easy input message
    )


class ResponsesFunctionTool(Strict):
    name: FunctionName
    description: str | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class OtherTool(Strict):
    """Hosted tools (web_search, file_search, ...): the responses unit answers 400 unsupported_tool."""

    type: str


class ResponsesFunctionChoice(Strict):
    name: str


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    NamedResponsesToolChoice = Any
    ResponsesTool = Any
else:
    NamedResponsesToolChoice = tagged(
        "type", {"function": ResponsesFunctionChoice, "allowed_tools": AllowedTools}, other=OtherTool
    )
    ResponsesTool = tagged("type", {"function": ResponsesFunctionTool}, other=OtherTool)
ResponsesToolChoice = Union[Literal["none", "auto", "required"], NamedResponsesToolChoice]


class JsonSchemaTextFormat(Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    schema_: JsonObject = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    TextFormat = Any
else:
    TextFormat = tagged("type", {"text": Empty, "json_object": Empty, "json_schema": JsonSchemaTextFormat})


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(Strict):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(Strict):
    model: str
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: ResponsesToolChoice | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: PositiveInt | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: Metadata | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


# ---------------------------------------------------------------- Anthropic Messages
# The Messages API as the messages unit maps it onto chat completions. Unknown
# fields (`cache_control` on any block, `container`, `context_management`, …)
# are accepted and ignored like everywhere here; images and documents are
# refused with the same codes as on the OpenAI routes.


class CacheControl(Strict):
    type: str


class AnthropicText(Strict):
    text: str
    cache_control: CacheControl | None = None


_ANTHROPIC_MEDIA = {"image": Image, "document": File}
if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    AnthropicResultPart = Any
else:
    AnthropicResultPart = tagged("type", {"text": AnthropicText, **_ANTHROPIC_MEDIA})


class AnthropicToolResult(Strict):
    tool_use_id: str
    content: str | list[AnthropicResultPart] | None = None
    is_error: bool | None = None


class AnthropicToolUse(Strict):
    id: str
    name: str
    input: JsonObject


class AnthropicThinking(Strict):
    thinking: str
    signature: str | None = None


class AnthropicRedactedThinking(Strict):
    data: str


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    AnthropicUserPart = Any
    AnthropicAssistantPart = Any
else:
    AnthropicUserPart = tagged("type", {"text": AnthropicText, "tool_result": AnthropicToolResult, **_ANTHROPIC_MEDIA})
    AnthropicAssistantPart = tagged(
        "type",
        {
            "text": AnthropicText,
            "tool_use": AnthropicToolUse,
            "thinking": AnthropicThinking,
            "redacted_thinking": AnthropicRedactedThinking,
            **_ANTHROPIC_MEDIA,
        },
    )


class AnthropicUserTurn(Strict):
    content: str | list[AnthropicUserPart]


class AnthropicAssistantTurn(Strict):
    content: str | list[AnthropicAssistantPart]


class AnthropicCustomTool(Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]
    description: str | None = None
    input_schema: JsonObject
    strict: bool | None = None


class AnthropicOutputFormat(Strict):
    """`output_config.format`: structured outputs, a JSON schema the reply follows."""

    type: Literal["json_schema"]
    schema_: Annotated[JsonObject, Field(alias="schema")]


class AnthropicOutputConfig(Strict):
    format: AnthropicOutputFormat | None = None


class AnthropicServerTool(Strict):
    """Anthropic-hosted tools (web_search_…, bash_…): the messages unit answers 400 unsupported_tool."""

    type: str


class AnthropicToolChoiceTool(Strict):
    name: str
    disable_parallel_tool_use: bool | None = None


class AnthropicToolChoiceAuto(Strict):
    disable_parallel_tool_use: bool | None = None


class AnthropicMetadata(Strict):
    user_id: str | None = None


if TYPE_CHECKING:  # tagged() builds these unions at run time; to a static checker they are Any
    AnthropicTurn = Any
    AnthropicSystemPart = Any
    AnthropicTool = Any
    AnthropicToolChoice = Any
else:
    AnthropicTurn = tagged("role", {"user": AnthropicUserTurn, "assistant": AnthropicAssistantTurn})
    AnthropicSystemPart = tagged("type", {"text": AnthropicText})
    AnthropicTool = tagged("type", {"custom": AnthropicCustomTool}, default="custom", other=AnthropicServerTool)
    AnthropicToolChoice = tagged(
        "type",
        {"auto": AnthropicToolChoiceAuto, "any": AnthropicToolChoiceAuto, "tool": AnthropicToolChoiceTool, "none": Empty},
    )


class CountTokensRequest(Strict):
    """`POST /v1/messages/count_tokens`: a Messages request without `max_tokens`."""

    model: str
    messages: Annotated[list[AnthropicTurn], Field(min_length=1)]
    system: str | list[AnthropicSystemPart] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: JsonObject | None = None


class MessagesRequest(CountTokensRequest):
    """`POST /v1/messages`, Anthropic's ``MessageCreateParams`` as far as the gateway serves it."""

    max_tokens: PositiveInt
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool | None = None
    metadata: AnthropicMetadata | None = None
    service_tier: str | None = None
    output_config: AnthropicOutputConfig | None = None


# ---------------------------------------------------------------- embeddings


class EmbeddingsRequest(Strict):
    """OpenAI's ``CreateEmbeddingRequest``: text or token arrays, relayed as sent."""

    model: str
    input: Union[
        str,
        Annotated[list[str], Field(min_length=1, max_length=2048)],
        Annotated[list[int], Field(min_length=1)],
        Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=2048)],
    ]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None
    user: str | None = None


__all__ = [
    "BAD_TAG",
    "MISSING_FIELD",
    "UNSUPPORTED",
    "ChatCompletionRequest",
    "CountTokensRequest",
    "EmbeddingsRequest",
    "MessagesRequest",
    "ResponsesRequest",
]
