"""Input validation unit: reject malformed requests before anything else is spent.

Checks the parsed body (`call.body`, parsed once by the route) against the
models in `middleware.validation.schemas` — chat completions, Responses,
Anthropic Messages or embeddings, by endpoint — and then that the model is
configured, allowed for the caller's key, and of the route's kind (an
embedding model only on `/v1/embeddings`, a chat model everywhere else).
Nothing is changed: the body and its raw bytes are forwarded as they came.
A chat body of the commonest shape is passed by `plain.plainly_valid_chat`
without the schema (it only ever says yes where the schema would).

A rejection is one OpenAI-shaped 400: ``param`` is the offending field's path
in OpenAI style (``messages[2].content[0].type``), ``code`` is
``missing_required_parameter`` or ``invalid_value``, or for media inputs the
exact ``unsupported_image_input`` / ``unsupported_audio_input`` /
``unsupported_file_input`` (the message a sentence naming the code). Of pydantic's errors, media
errors win, then the first error; where that error sits in a union (a string
*or* an array, ...) the deepest error of the same union is reported, since it
belongs to the branch the client meant.

Body size, invalid JSON, non-object bodies and the content type are handled
by `proxy.web.routes.read_json_body` before the pipeline runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from proxy.core.call import EMBEDDINGS, MESSAGES, MESSAGES_COUNT_TOKENS, RESPONSES, Call, Next, Reply
from proxy.core.errors import ApiError, invalid_request, model_not_found, wrong_model_kind
from proxy.core.params import field_path
from proxy.core.pipeline import Unit

from middleware.validation.plain import plainly_valid_chat
from middleware.validation.schemas import (
    BAD_TAG,
    MISSING_FIELD,
    UNSUPPORTED,
    ChatCompletionRequest,
    CountTokensRequest,
    EmbeddingsRequest,
    MessagesRequest,
    ResponsesRequest,
)

# Built once per process; calling the core validator skips model bookkeeping.
CHAT_VALIDATOR = ChatCompletionRequest.__pydantic_validator__
RESPONSES_VALIDATOR = ResponsesRequest.__pydantic_validator__
# Every other endpoint's schema; chat completions is the default.
VALIDATORS: dict[str, Any] = {
    RESPONSES: RESPONSES_VALIDATOR,
    MESSAGES: MessagesRequest.__pydantic_validator__,
    MESSAGES_COUNT_TOKENS: CountTokensRequest.__pydantic_validator__,
    EMBEDDINGS: EmbeddingsRequest.__pydantic_validator__,
}

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}
_MISSING = ("missing", MISSING_FIELD)
_LENGTH = ("too_long", "too_short")
MAX_DEPTH = 254  # orjson.dumps refuses deeper structures


class ValidationUnit(Unit):
    """Validates request bodies and the requested model; changes nothing."""

    name = "validation"

    def __init__(self, settings: Any, gateway: Any) -> None:
        super().__init__(settings, gateway)
        settings = gateway.settings
        self._models = frozenset(settings.models)
        self._embeddings = frozenset(name for name in settings.models if settings.model_kind(name) == "embeddings")

    def __call__(self, call: Call, next: Next) -> Awaitable[Reply]:
        # A plain function: it only checks (see Unit.__call__).
        validate_body(call.endpoint, call.body, call.raw)
        model = call.body["model"]
        if model not in self._models or not call.principal.may_use(model):
            raise model_not_found(model)
        if (model in self._embeddings) != (call.endpoint == EMBEDDINGS):
            raise wrong_model_kind(model, call.endpoint == EMBEDDINGS)
        return next(call)

    def openapi_schemas(self) -> dict[str, type[BaseModel]]:
        # The request bodies this unit checks: /openapi.json describes them with the very models.
        return {
            model.__name__: model
            for model in (ChatCompletionRequest, ResponsesRequest, MessagesRequest, CountTokensRequest, EmbeddingsRequest)
        }


def validate_body(endpoint: str, body: dict[str, Any], raw: bytes | None = None) -> None:
    """Raise the OpenAI-shaped 400 for the first problem in `body`, if any."""
    validator = VALIDATORS.get(endpoint, CHAT_VALIDATOR)
    # The commonest chat bodies are known valid at a quarter of the schema's cost (plain.py),
    # and nest three levels at most (body, messages, message): no depth to check either.
    if validator is CHAT_VALIDATOR and plainly_valid_chat(body):
        return
    try:
        validator.validate_python(body)
    except ValidationError as exc:
        raise to_api_error(exc.errors(include_url=False), body) from None
    _check_depth(body, raw)


def _check_depth(body: dict[str, Any], raw: bytes | None) -> None:
    """Refuse nesting the gateway could not serialise again.

    orjson parses deeper JSON than it writes (its writer stops at 255 levels),
    and any later change to the body re-serialises it. The bracket count is an
    upper bound of the depth found at C speed, so typical bodies skip the
    exact check (one serialisation attempt).
    """
    if raw is not None and raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    try:
        orjson.dumps(body)
    except TypeError:
        raise invalid_request("The request body is nested too deeply.", param=None) from None


def to_api_error(errors: Sequence[ErrorDetails], body: Any) -> ApiError:
    """Turn pydantic's error list into the one error the client should see."""
    media = next((e for e in errors if e["type"] in UNSUPPORTED), None)
    if media is not None:
        path, _ = _walk(media["loc"], body, missing=False)
        return ApiError(400, media["msg"], code=media["type"], param=_format(path) or None)
    first = errors[0]
    _, union_at = _walk(first["loc"], body, missing=first["type"] in _MISSING)
    prefix = first["loc"][:union_at]
    # Errors of the same union as the first one, with their client-side paths.
    same = [(e, _error_path(e, body)) for e in errors if e["loc"][:union_at] == prefix]
    # A branch whose one complaint is its length took every element as it was:
    # it is the one the client meant (2,049 strings are too many strings, not
    # strings where integers belong), although other branches failed deeper.
    length = [(e, path) for e, path in same if e["type"] in _LENGTH and len(e["loc"]) == union_at + 1]
    for error, path in length:
        if sum(1 for e, _ in same if e["loc"][: union_at + 1] == error["loc"]) == 1:
            return _describe(error, path)
    deepest = max(len(path) for _, path in same)
    target = next(path for _, path in same if len(path) == deepest)
    here = [e for e, path in same if path == target]
    specific = [e for e in here if not _is_type_error(e)]
    return _describe(specific[0], target) if specific else _type_error(here, target)


def _walk(loc: tuple[int | str, ...], body: Any, *, missing: bool) -> tuple[list[int | str], int]:
    """Map a pydantic location onto the client's JSON.

    Returns the path of real keys/indexes, and the index in `loc` of the first
    ambiguous union branch label (``str``, ``list[...]``; tag labels of
    `schemas.tagged` contain "=" and are not ambiguous), or len(loc).
    """
    path: list[int | str] = []
    union_at = len(loc)
    data = body
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(data, list) and part < len(data):
            path.append(part)
            data = data[part]
        elif isinstance(part, str) and isinstance(data, dict) and part in data:
            path.append(part)
            data = data[part]
        elif missing and i == len(loc) - 1:
            path.append(part)  # the absent field itself
        elif union_at == len(loc) and isinstance(part, str) and "=" not in part:
            union_at = i
    return path, union_at


def _error_path(error: ErrorDetails, body: Any) -> list[int | str]:
    path, _ = _walk(error["loc"], body, missing=error["type"] == "missing")
    if error["type"] in (MISSING_FIELD, BAD_TAG):
        path.append(error["ctx"]["field"])
    return path


def _format(path: Sequence[int | str]) -> str:
    return field_path(path)


def _is_type_error(error: ErrorDetails) -> bool:
    if error["type"] == "literal_error":
        return not isinstance(error["input"], str)  # a wrong string is a wrong *value*
    return error["type"] in _EXPECTED


def _type_error(errors: list[ErrorDetails], path: list[int | str]) -> ApiError:
    expected: list[str] = []
    for error in errors:
        literal = error["type"] == "literal_error"
        what = f"a string ({error['ctx']['expected']})" if literal else _EXPECTED[error["type"]]
        if what not in expected:
            expected.append(what)
    param = _format(path)
    return invalid_request(
        f"Invalid type for '{param}': expected {' or '.join(expected)}, but got {_kind(errors[0]['input'])} instead.",
        param=param,
    )


def _describe(error: ErrorDetails, path: list[int | str]) -> ApiError:
    param = _format(path) or None
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _MISSING:
        return invalid_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == BAD_TAG:
        supported = ", ".join(f"'{tag}'" for tag in ctx["expected"])
        return invalid_request(
            f"Invalid value for '{param}': {_show(ctx['got'])}. Supported values are: {supported}.", param=param
        )
    if kind == "literal_error":
        return invalid_request(
            f"Invalid value for '{param}': {_show(error['input'])}. Supported values are: {ctx['expected']}.",
            param=param,
        )
    msg = error["msg"].replace(" after validation", "")
    value = error.get("input")
    got = f", but got {value!r}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return invalid_request(f"Invalid value for '{param}': {msg[:1].lower()}{msg[1:]}{got}.", param=param)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value: Any) -> str:
    """A client value quoted in a message, kept short (it may be huge or binary-ish)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "…")
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return _kind(value)


__all__ = ["ValidationUnit", "to_api_error", "validate_body"]
