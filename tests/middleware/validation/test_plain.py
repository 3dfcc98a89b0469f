"""The plain-chat shortcut agrees with the schema: what it calls valid, ChatCompletionRequest accepts.

`plainly_valid_chat` may answer False for a valid body (the schema then
decides), never True for an invalid one. Checked three ways: every field the
shortcut knows (and others) with each of a list of values on both sides of
every constraint, every message shape from a grid of roles, contents and
extra fields, and Hypothesis combinations of such changes to a plain body.
A last property draws only plain bodies, so the shortcut is shown to be
taken, not merely harmless.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bench.profiles import request_body
from middleware.validation.plain import FIELDS, STREAM_OPTIONS, TEXT_ROLES, plainly_valid_chat
from middleware.validation.unit import CHAT_VALIDATOR, validate_body
from proxy.core.call import CHAT

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-3, max_value=3),
    st.text(max_size=5),
    st.sampled_from([[], {}, "", 0, 1, 2, -1, 0.5, 2.5, 128, 129, None, True, False]),  # edges, often
)
NESTED = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
ANY = SCALARS | NESTED  # half scalars: a nested value alone rarely meets a scalar field's edge


def _number(low: float, high: float) -> Any:
    return st.integers(int(low), int(high)) | st.floats(low, high)


PLAIN_VALUES = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "n": st.integers(1, 128),
    "max_tokens": st.integers(1, 2**40),
    "max_completion_tokens": st.integers(1, 2**40),
    "stream": st.booleans(),
    "stream_options": st.dictionaries(st.sampled_from(sorted(STREAM_OPTIONS)), st.booleans()),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "logprobs": st.booleans(),
    "seed": st.integers(-(2**63), 2**63),
    "user": st.text(max_size=8),
    "store": st.booleans(),
    "parallel_tool_calls": st.booleans(),
}
PLAIN_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(sorted(TEXT_ROLES)), "content": st.text(max_size=20)}, optional={"name": st.text(max_size=5)}
)


@st.composite
def plain_bodies(draw: Any) -> dict[str, Any]:
    body = {"model": draw(st.text(max_size=8)), "messages": draw(st.lists(PLAIN_MESSAGE, min_size=1, max_size=4))}
    for field in draw(st.lists(st.sampled_from(sorted(PLAIN_VALUES)), max_size=6, unique=True)):
        body[field] = draw(PLAIN_VALUES[field])
    return body


MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "refusal", "extra"]
OTHERS = ["tools", "tool_choice", "stop", "metadata", "response_format", "logit_bias", "functions", "unknown_field"]


# Per known field: values on both sides of its constraint (ANY adds values of other types).
EDGES = {
    "temperature": _number(-2, 4),
    "top_p": _number(-2, 3),
    "n": st.integers(-1, 130),
    "max_tokens": st.integers(-2, 3),
    "max_completion_tokens": st.integers(-2, 3),
    "presence_penalty": _number(-4, 4),
    "frequency_penalty": _number(-4, 4),
    "stream_options": st.dictionaries(st.sampled_from(sorted(STREAM_OPTIONS) + ["other"]), ANY, max_size=3),
}


@st.composite
def near_plain_bodies(draw: Any) -> dict[str, Any]:
    """A plain body with one to three changes: a known field's value (in range or not), another field, a message or its fields, a field gone."""
    body = draw(plain_bodies())
    for _ in range(draw(st.integers(1, 3))):
        change = draw(st.sampled_from(["known", "known", "other", "message", "message field", "drop"]))
        messages = body.get("messages")
        if change == "known":
            field = draw(st.sampled_from(sorted(FIELDS) + ["model", "messages"]))
            body[field] = draw(EDGES.get(field, ANY) | ANY)
        elif change == "other":
            body[draw(st.sampled_from(OTHERS))] = draw(ANY)
        elif change == "drop" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        elif isinstance(messages, list) and messages:
            at = draw(st.integers(0, len(messages) - 1))
            if change == "message" or not isinstance(messages[at], dict):
                messages[at] = draw(ANY | st.fixed_dictionaries({"role": st.sampled_from(["tool", "function", "bogus"]), "content": st.text()}))
            elif draw(st.booleans()):
                messages[at][draw(st.sampled_from(MESSAGE_FIELDS))] = draw(ANY)
            else:
                messages[at].pop(draw(st.sampled_from(MESSAGE_FIELDS)), None)
    return body


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_plain_bodies())
def test_what_the_shortcut_calls_valid_the_schema_accepts(body):
    if plainly_valid_chat(body):
        CHAT_VALIDATOR.validate_python(body)  # raises if the shortcut was wrong


# Every field gets each of these; they sit on both sides of every constraint the shortcut tests.
EDGE_VALUES = [
    None, True, False, 0, 1, -1, 2, -2, 3, -3, 20, 128, 129, 2**63, -(2**63), 2**64,
    0.0, -0.0, 0.5, 1.0, 1.0000001, 1.5, 2.0, 2.0000001, 2.5, -0.1, -2.0, -2.0000001, -2.5, 1e30, -1e30,
    float("inf"), float("-inf"), float("nan"), "", "x", [], ["x"], {}, {"x": 1},
    {"include_usage": True}, {"include_usage": False, "include_obfuscation": True}, {"include_usage": "yes"},
    {"include_usage": None}, {"include_usage": True, "other": True},
]
BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("field", sorted(FIELDS) + ["model", "messages"] + OTHERS)
def test_each_field_at_its_edges_agrees_with_the_schema(field):
    taken = 0
    for value in EDGE_VALUES:
        body = {**BASE, field: value}
        if plainly_valid_chat(body):
            taken += 1
            CHAT_VALIDATOR.validate_python(body)  # raises if the shortcut was wrong
    if field in FIELDS or field == "model":
        assert taken  # the shortcut is taken for some value of every field it knows


MESSAGE_VARIANTS = [
    {"role": role, "content": content, **extra}
    for role in ["system", "developer", "user", "assistant", "tool", "function", "bogus", "", None, 1]
    for content in ["", "x", None, [], [{"type": "text", "text": "x"}], 1, {}]
    for extra in [{}, {"name": ""}, {"name": 1}, {"name": None}, {"tool_calls": []}, {"tool_calls": [1]}, {"function_call": 1}, {"tool_call_id": "t"}, {"refusal": "r"}]
] + [{}, {"content": "x"}, {"role": "user"}, [], "user", None]


def test_each_message_shape_agrees_with_the_schema():
    taken = 0
    for message in MESSAGE_VARIANTS:
        for messages in ([message], [BASE["messages"][0], message]):
            body = {**BASE, "messages": messages}
            if plainly_valid_chat(body):
                taken += 1
                CHAT_VALIDATOR.validate_python(body)
    assert taken >= 2 * 4 * 2 * 2  # four text roles, string content, with and without a string name


def test_every_field_the_shortcut_knows_has_a_plain_strategy():
    assert set(PLAIN_VALUES) == set(FIELDS)


@settings(max_examples=500, deadline=None)
@given(plain_bodies())
def test_plain_bodies_take_the_shortcut_and_are_valid(body):
    assert plainly_valid_chat(body)
    CHAT_VALIDATOR.validate_python(body)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": []},  # the schema: at least one message
        {"model": "m", "messages": [{"role": "assistant", "content": None}]},  # content or a call required
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": True},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 129},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"model": "m", "messages": [{"role": "tool", "content": "x"}]},  # tool_call_id required
    ],
)
def test_invalid_bodies_still_get_the_schemas_error(body):
    assert not plainly_valid_chat(body)
    with pytest.raises(ValidationError):
        CHAT_VALIDATOR.validate_python(body)


def test_the_benchmarks_body_takes_the_shortcut():
    body = orjson.loads(request_body("/v1/chat/completions", False, 16))
    assert plainly_valid_chat(body)
    validate_body(CHAT, body)
