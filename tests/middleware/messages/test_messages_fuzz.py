"""Random input never crashes the Messages translators (hypothesis).

Known fields of a valid Messages body get random JSON values (as the route's
parser can produce them: integers within 64 bits): validation
either refuses the body with a 400, or the body maps onto chat (refusing only
Anthropic's server tools, 400 unsupported_tool); unvalidated, the mapping
itself fails only with a 400. Random chat
replies and chunks map onto Messages and Anthropic events, failing at most
with the provider error the relay renders.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from middleware.messages.reply import to_message
from middleware.messages.request import to_chat
from middleware.messages.stream import StreamTranslator
from middleware.validation.unit import validate_body
from proxy.core.call import MESSAGES
from proxy.core.errors import ApiError, UpstreamError
from tests.middleware.test_fuzz import _put
from tests.middleware.test_fuzz import wire_json_values as json_values  # bodies as the route parses them

BASE: dict[str, Any] = {
    "model": "sovereign-alpha",
    "max_tokens": 10,
    "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]},
    ],
    "tools": [{"name": "f", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "auto"},
    "metadata": {"user_id": "u"},
}
PATHS = [
    ("model",), ("max_tokens",), ("system",), ("system", 0), ("system", 0, "text"), ("messages",), ("messages", 0),
    ("messages", 0, "role"), ("messages", 0, "content"), ("messages", 1, "content"), ("messages", 1, "content", 0),
    ("messages", 1, "content", 0, "input"), ("messages", 2, "content", 0), ("messages", 2, "content", 0, "content"),
    ("tools",), ("tools", 0), ("tools", 0, "type"), ("tools", 0, "input_schema"), ("tool_choice",),
    ("tool_choice", "type"), ("stop_sequences",), ("temperature",), ("metadata",), ("stream",), ("thinking",),
]


@st.composite
def bodies(draw: st.DrawFn) -> Any:
    body: Any = BASE
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        body = _put(body, draw(st.sampled_from(PATHS)), draw(json_values))
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies())
def test_validated_bodies_always_map_and_others_are_400s(body):
    try:
        validate_body(MESSAGES, body)
    except ApiError as error:
        assert error.status == 400
        try:
            to_chat(body)  # without validation in front, the mapping refuses on its own
        except ApiError as unvalidated:
            assert unvalidated.status == 400
        return
    try:
        chat = to_chat(body)
    except ApiError as refused:
        # Validation lets any tool `type` through (the mapping names the unsupported ones).
        assert refused.status == 400 and refused.code == "unsupported_tool" and refused.param == "tools[0].type"
        return
    assert isinstance(chat["messages"], list) and chat["messages"]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(json_values, st.lists(json_values, max_size=5))
def test_random_replies_and_chunks_map(completion, chunks):
    if isinstance(completion, dict):
        message = to_message(completion, "msg_x", "m", ["S"])
        assert message["type"] == "message" and isinstance(message["content"], list)
    translator = StreamTranslator("msg_x", "m", None, 1)
    list(translator.start())
    try:
        for chunk in chunks:
            if isinstance(chunk, dict):
                list(translator.chunk(chunk))
        translator.saw_done = True
        events = [event.json()["type"] for event in translator.finish()]
    except UpstreamError:
        return  # an in-band provider error: the relay writes it as the `error` event
    assert events[-2:] == ["message_delta", "message_stop"]
