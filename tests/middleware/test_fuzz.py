"""Fuzzing the running gateway over a real socket.

Hypothesis generates request bodies — random bytes, invalid UTF-8, deep
nesting, huge strings, random JSON values put into known fields of otherwise
valid chat and Responses bodies — and sends them to one gateway
(["validation", "legacy_functions"] in front of the simulated provider). For
every body: no 5xx, no traceback, every error in the OpenAI shape, and the
provider is reached exactly when the body passes validation.

Hypothesis drives a synchronous test; the gateway, the provider and the HTTP
session live on an event loop in a background thread (one for all examples).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from middleware.legacy_functions import normalize_request
from middleware.validation.unit import validate_body
from proxy.core.call import CHAT, RESPONSES
from proxy.core.errors import ApiError
from proxy.devtools.mock_upstream import MockUpstream
from tests.support import make_settings, start_gateway

MODEL = "sovereign-alpha"
CHAT_BASE: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "temperature": 0.5,
}
RESPONSES_BASE: dict[str, Any] = {
    "model": MODEL,
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    "text": {"format": {"type": "text"}},
}
CHAT_PATHS = [
    ("model",), ("messages",), ("messages", 1), ("messages", 1, "content"), ("messages", 1, "role"),
    ("messages", 1, "content", 0), ("temperature",), ("top_p",), ("n",), ("max_tokens",), ("max_completion_tokens",),
    ("stream",), ("stream_options",), ("stop",), ("tools",), ("tools", 0), ("tools", 0, "function"),
    ("tools", 0, "function", "name"), ("tool_choice",), ("response_format",), ("functions",), ("function_call",),
    ("metadata",), ("logit_bias",), ("some_future_field",),
]
RESPONSES_PATHS = [
    ("model",), ("input",), ("input", 0), ("input", 0, "content"), ("input", 0, "content", 0), ("input", 0, "role"),
    ("instructions",), ("tools",), ("tools", 0), ("tool_choice",), ("text",), ("text", "format"), ("reasoning",),
    ("max_output_tokens",), ("previous_response_id",), ("store",), ("metadata",), ("temperature",), ("stream",),
]
SHAPED = [
    {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "u"}}, {"type": "input_image"},
    {"type": "function", "function": {"name": "g"}}, {"role": "user", "content": "x"}, {"name": "g"},
    {"type": "json_schema"}, {"include_usage": True}, "auto", "none", "required", "user", "function",
]

def _json_values(integers: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | integers
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30) | st.sampled_from(SHAPED),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    )


# Beyond 64 bits too: validation must refuse what it cannot forward.
json_values = _json_values(st.integers(min_value=-(2**70), max_value=2**70))
# What the HTTP layer can hand over: orjson reads integers beyond 64 bits as floats.
wire_json_values = _json_values(st.integers(min_value=-(2**63), max_value=2**64 - 1))


def _put(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of `body` with `value` at `path` (silently skipped where the path does not exist)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(body, dict):
        return {**body, head: _put(body.get(head), rest, value)} if rest == () or head in body else body
    if isinstance(body, list) and isinstance(head, int) and head < len(body):
        return [*body[:head], _put(body[head], rest, value), *body[head + 1 :]]
    return body


def _dump(value: Any) -> bytes:
    # stdlib json: big integers and lone surrogates (-> invalid UTF-8) survive into the bytes.
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    endpoint = draw(st.sampled_from([CHAT, RESPONSES]))
    base, paths = (CHAT_BASE, CHAT_PATHS) if endpoint == CHAT else (RESPONSES_BASE, RESPONSES_PATHS)
    body = base
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        body = _put(body, draw(st.sampled_from(paths)), draw(json_values))
    return endpoint, _dump(body)


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, bytes]:
    endpoint = draw(st.sampled_from([CHAT, RESPONSES]))
    kind = draw(st.sampled_from(["bytes", "json", "deep", "huge", "bad_utf8", "surrogate"]))
    if kind == "bytes":
        return endpoint, draw(st.binary(max_size=512))
    if kind == "json":
        return endpoint, _dump(draw(json_values))
    if kind == "deep":
        depth = draw(st.integers(min_value=100, max_value=20_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        field = draw(st.sampled_from([b"messages", b"input", b"tools", b"metadata", b"x"]))
        return endpoint, b'{"model":"sovereign-alpha","' + field + b'":' + opener * depth + b"1" + closer * depth + b"}"
    if kind == "huge":
        text = "é" * draw(st.integers(min_value=100_000, max_value=1_000_000))
        path = draw(st.sampled_from([("model",), ("tool_choice",), ("messages", 1, "content"), ("input",), ("user",)]))
        base = CHAT_BASE if endpoint == CHAT else RESPONSES_BASE
        return endpoint, _dump(_put(base, path, text))
    if kind == "bad_utf8":
        raw = _dump(CHAT_BASE if endpoint == CHAT else RESPONSES_BASE)
        at = raw.index(b"hi")
        return endpoint, raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    return endpoint, b'{"model":"sovereign-alpha","messages":[{"role":"user","content":"\\ud800"}]}'


class LiveGateway:
    """Simulated provider + gateway + HTTP session on a loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.mock = MockUpstream()
        self.mock.url = await self.mock.start()
        self.gateway = await start_gateway(make_settings(self.mock.url, pipeline=["validation", "legacy_functions"]))
        self.session = aiohttp.ClientSession()

    async def post(self, endpoint: str, data: bytes) -> tuple[int, str, bytes]:
        path = "/chat/completions" if endpoint == CHAT else "/responses"
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.gateway.v1 + path, data=data, headers=headers) as resp:
            return resp.status, resp.content_type, await resp.read()

    async def _stop(self) -> None:
        await self.session.close()
        await self.gateway.close()
        await self.mock.close()

    def close(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def live() -> Iterator[LiveGateway]:
    gateway = LiveGateway()
    yield gateway
    gateway.close()


def _passes_validation(endpoint: str, data: bytes) -> bool:
    """The oracle: should this body reach the provider?"""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(body, dict):
        return False
    try:
        validate_body(endpoint, body, data)
        if endpoint == CHAT:
            normalize_request(body)  # the legacy_functions unit's own refusals (`tools` with `function_call`)
    except ApiError:
        return False
    return body["model"] == MODEL


def _check(live: LiveGateway, endpoint: str, data: bytes) -> None:
    before = len(live.mock.requests)
    status, content_type, reply = live.run(live.post(endpoint, data))
    reached = len(live.mock.requests) - before
    assert status < 500, reply[:500]
    assert b"Traceback" not in reply
    if status >= 400:
        assert content_type == "application/json"
        err = orjson.loads(reply)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert err["param"] is None or isinstance(err["param"], str)
        assert len(err["message"]) < 1000  # never echoes huge input
    assert reached == (1 if _passes_validation(endpoint, data) else 0), (status, reply[:300])


FUZZ_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def test_fuzzed_bodies_never_break_the_gateway(live: LiveGateway) -> None:
    @FUZZ_SETTINGS
    @given(case=st.one_of(mutated(), hostile()))
    def check(case: tuple[str, bytes]) -> None:
        _check(live, *case)

    check()
    # Both kinds of outcome were exercised: some bodies were served, most refused.
    assert live.mock.stats["requests"] > 0


def test_fixed_hostile_bodies(live: LiveGateway) -> None:
    """Cases worth keeping regardless of what hypothesis draws."""
    cases = [
        (CHAT, b"\x00\xff\xfe"),
        (CHAT, b'{"model":"sovereign-alpha","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        (RESPONSES, b'{"model":"sovereign-alpha","input":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"),
        # Deeper than the gateway can re-serialise, in a field validation ignores: 400, not 500.
        (CHAT, _dump(CHAT_BASE)[:-1] + b',"x":' + b"[" * 300 + b"]" * 300 + b"}"),
        (CHAT, _dump(CHAT_BASE)[:-1] + b',"x":' + b"[" * 200 + b"]" * 200 + b"}"),  # fine: served
        (CHAT, _dump({**CHAT_BASE, "n": 2**80})),
        (CHAT, _dump({**CHAT_BASE, "temperature": 1e308})),
        (CHAT, _dump({**CHAT_BASE, "messages": [{"role": "user", "content": "\ud800"}]})),
        (CHAT, _dump({**CHAT_BASE, "messages": [{"role": {"nested": "dict"}, "content": "x"}]})),
        (CHAT, _dump({**CHAT_BASE, "messages": [{"role": ["user"], "content": "x"}]})),
        (RESPONSES, _dump({**RESPONSES_BASE, "input": [{"type": ["message"]}]})),
        (CHAT, _dump({**CHAT_BASE, "model": ["sovereign-alpha"]})),
        # Valid to the schema, refused by legacy_functions (hypothesis drew it once: the oracle knew only the schema).
        (CHAT, _dump({**CHAT_BASE, "function_call": "auto",
                      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})),
        (CHAT, _dump({**CHAT_BASE, "messages": [{"role": "user", "content": "x" * 3_000_000}]})),
    ]
    for endpoint, data in cases:
        _check(live, endpoint, data)
