"""The plain-chat check: a chat body of the commonest shape, known valid without pydantic.

Most chat completions requests are a model, a few text messages and a handful
of scalar options. For those, the schema's verdict is known from a few type
and range tests, and pydantic's validation (the model, its union of message
roles, thirty optional fields) costs about four times as much (instruction
counts in bench/RESULTS.md). `plainly_valid_chat` answers True only for such a
body, each field tested exactly as `ChatCompletionRequest` constrains it; any
field it does not know, any other shape or a value out of range answers False,
which means "ask the schema", never "invalid". So the schema stays the one
definition of what is valid and of every error message; this is a shortcut to
its "yes" (tests/middleware/validation/test_plain.py checks the two agree).
Every value it accepts is a scalar, but for the messages and `stream_options`:
such a body nests three levels at most, so `validate_body` skips its depth check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Roles whose message is exactly {role, content[, name]} with string content and
# needs nothing else (assistant: content present, so no tool call is required).
TEXT_ROLES = frozenset({"system", "developer", "user", "assistant"})
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})


def _string(value: Any) -> bool:
    return type(value) is str


def _boolean(value: Any) -> bool:
    return type(value) is bool


def _integer(value: Any) -> bool:
    return type(value) is int  # not bool, as the strict schema


def _positive(value: Any) -> bool:
    return type(value) is int and value >= 1


def _number(low: float, high: float) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        # The strict schema's float takes ints too, never bools; NaN fails the range.
        return (type(value) is float or type(value) is int) and low <= value <= high

    return check


def _choices(value: Any) -> bool:
    return type(value) is int and 1 <= value <= 128


def _stream_options(value: Any) -> bool:
    return type(value) is dict and all(
        field in STREAM_OPTIONS and type(flag) is bool for field, flag in value.items()
    )


# Tested by plainly_valid_chat itself, before the others.
CHECKED_FIRST = frozenset({"model", "messages"})
# Every other top-level field this check knows, with ChatCompletionRequest's constraint on it.
FIELDS: dict[str, Callable[[Any], bool]] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "n": _choices,
    "max_tokens": _positive,
    "max_completion_tokens": _positive,
    "stream": _boolean,
    "stream_options": _stream_options,
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logprobs": _boolean,
    "seed": _integer,
    "user": _string,
    "store": _boolean,
    "parallel_tool_calls": _boolean,
}


def plainly_valid_chat(body: dict[str, Any]) -> bool:
    """True when `body` is a valid chat completions request of the plain shape; False: ask the schema."""
    messages = body.get("messages")
    if type(messages) is not list or not messages or type(body.get("model")) is not str:
        return False
    for message in messages:
        if type(message) is not dict:
            return False
        role = message.get("role")
        if type(role) is not str or role not in TEXT_ROLES or type(message.get("content")) is not str:
            return False
        if len(message) > 2 and (type(message.get("name", "")) is not str or not message.keys() <= MESSAGE_FIELDS):
            return False
    for field, value in body.items():
        if field in CHECKED_FIRST:
            continue
        check = FIELDS.get(field)
        if check is None or not check(value):
            return False
    return True
