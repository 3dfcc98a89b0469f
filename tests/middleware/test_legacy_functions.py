"""Legacy function calling through the gateway (official SDK, simulated provider)
and properties of the pure request/reply mappings."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.legacy_functions import (
    _legacy_event,
    call_id,
    chunk_to_legacy,
    completion_to_legacy,
    convert_messages,
    normalize_request,
)
from proxy.core.call import SSEEvent
from proxy.core.errors import ApiError
from proxy.core.streams import EventStream
from tests.support import make_settings

MODEL = "sovereign-alpha"
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}
ASK = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture
async def gw(mock, gateway_factory):
    return await gateway_factory(make_settings(mock.url, pipeline=["validation", "legacy_functions"]))


async def test_sdk_functions_round_trip(gw, mock):
    client = gw.openai()
    completion = await client.chat.completions.create(
        model=MODEL, messages=ASK, functions=[WEATHER, TIME], function_call="auto"
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "value", "days": 1}

    sent = mock.requests[-1]["body"]
    assert "functions" not in sent and "function_call" not in sent
    assert sent["tools"] == [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    assert sent["tool_choice"] == "auto"
    assert sent["parallel_tool_calls"] is False


async def test_sdk_named_function_call(gw, mock):
    client = gw.openai()
    completion = await client.chat.completions.create(
        model=MODEL, messages=ASK, functions=[WEATHER, TIME], function_call={"name": "get_time"}
    )
    assert completion.choices[0].message.function_call.name == "get_time"
    assert json.loads(completion.choices[0].message.function_call.arguments) == {"zone": "value"}
    assert mock.requests[-1]["body"]["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}


async def test_sdk_functions_streamed(gw, mock):
    client = gw.openai()
    stream = await client.chat.completions.create(
        model=MODEL, messages=ASK, functions=[WEATHER, TIME], stream=True
    )
    name, arguments, finish = "", "", None
    async for chunk in stream:
        for choice in chunk.choices:
            assert choice.delta.tool_calls is None
            if choice.delta.function_call is not None:
                name += choice.delta.function_call.name or ""
                arguments += choice.delta.function_call.arguments or ""
            finish = choice.finish_reason or finish
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "value", "days": 1}
    assert finish == "function_call"


async def test_raw_legacy_stream_has_no_tool_calls(gw, mock):
    body = {"model": MODEL, "messages": ASK, "functions": [WEATHER], "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json=body) as resp:
            raw = await resp.read()
    assert resp.status == 200
    assert b"tool_calls" not in raw
    assert b'"function_call":{"name":"get_weather","arguments":""}' in raw
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_modern_clients_are_untouched(gw, mock):
    client = gw.openai()
    tools = [{"type": "function", "function": WEATHER}]
    completion = await client.chat.completions.create(model=MODEL, messages=ASK, tools=tools)
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert "parallel_tool_calls" not in mock.requests[-1]["body"]


async def test_multi_turn_legacy_history_reaches_provider_with_paired_ids(gw, mock):
    client = gw.openai()
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"role": "function", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "user", "content": "and the time?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_time", "arguments": '{"zone":"CET"}'}},
        {"role": "function", "name": "get_time", "content": "12:00"},
    ]
    completion = await client.chat.completions.create(model=MODEL, messages=messages, functions=[WEATHER, TIME])
    # The history ends in a function result, so the provider answers with it (its name found
    # through the paired tool-call id).
    assert completion.choices[0].message.content == "Done: get_time returned 12:00 "
    sent = mock.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user", "assistant", "tool"]
    for call_at, result_at, name in ((1, 2, "get_weather"), (4, 5, "get_time")):
        (tool_call,) = sent[call_at]["tool_calls"]
        assert "function_call" not in sent[call_at]
        assert tool_call["type"] == "function"
        assert tool_call["function"] == messages[call_at]["function_call"]
        assert tool_call["function"]["name"] == name
        assert sent[result_at] == {"role": "tool", "tool_call_id": tool_call["id"], "content": messages[result_at]["content"]}
    assert sent[1]["tool_calls"][0]["id"] != sent[4]["tool_calls"][0]["id"]

    # The same history yields the same ids on the next request.
    await client.chat.completions.create(model=MODEL, messages=messages, functions=[WEATHER, TIME])
    assert mock.requests[-1]["body"]["messages"] == sent


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"functions": [WEATHER], "tools": [{"type": "function", "function": TIME}]}, "functions"),
        ({"functions": [WEATHER], "tool_choice": "auto"}, "functions"),
        ({"function_call": "auto", "tool_choice": "auto", "tools": [{"type": "function", "function": TIME}]}, "function_call"),
        ({"function_call": {"name": "get_weather"}}, "function_call"),
    ],
)
async def test_mixing_legacy_and_modern_is_400(gw, mock, extra, param):
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json={"model": MODEL, "messages": ASK, **extra}) as resp:
            reply = await resp.json()
    assert resp.status == 400
    assert reply["error"]["param"] == param and reply["error"]["code"] == "invalid_value"
    assert reply["error"]["type"] == "invalid_request_error"
    assert mock.requests == []


async def test_function_message_without_call_is_400(gw, mock):
    body = {"model": MODEL, "messages": [*ASK, {"role": "function", "name": "f", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json=body) as resp:
            reply = await resp.json()
    assert resp.status == 400 and reply["error"]["param"] == "messages[1]"
    assert mock.requests == []


# --------------------------------------------------------------- stream wrapper


async def test_stream_wrapper_keeps_untouched_events_and_drops_parallel_calls():
    head = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"

    raws = [
        chunk({"role": "assistant", "content": "tool_calls are mentioned here"}),
        chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({}, "tool_calls"),
        b": keepalive\n\n",
        b"data: [DONE]\n\n",
    ]
    source = [SSEEvent(raw) for raw in raws]

    async def events():
        for event in source:
            yield event

    out = [event async for event in EventStream(events(), observe=_legacy_event)]
    assert out[0] is source[0]  # mentions tool_calls only in text: parsed, unchanged, same object
    assert out[-2] is source[-2] and out[-1] is source[-1]
    assert len(out) == len(source) - 1  # the index-1 call is dropped
    deltas = [e.json()["choices"][0] for e in out[1:5]]
    assert deltas[0]["delta"] == {"function_call": {"name": "f", "arguments": ""}}
    assert "".join(d["delta"]["function_call"]["arguments"] for d in deltas[:3]) == '{"x":1}'
    assert deltas[3] == {"index": 0, "delta": {}, "finish_reason": "function_call"}
    assert all(b"tool_calls" not in e.raw for e in out[1:])


# --------------------------------------------------------------- properties

names = st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True)
arguments = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
).map(lambda v: json.dumps(v, ensure_ascii=False))


@settings(max_examples=150, deadline=None)
@given(
    functions=st.lists(names, min_size=1, max_size=4, unique=True),
    history=st.lists(st.tuples(names, arguments, st.text(max_size=30)), max_size=4),
    pick=st.integers(min_value=0, max_value=3),
    answer=arguments,
    pieces=st.integers(min_value=1, max_value=5),
)
def test_names_and_arguments_survive_the_round_trip(functions, history, pick, answer, pieces):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for name, args, result in history:
        messages.append({"role": "assistant", "content": None, "function_call": {"name": name, "arguments": args}})
        messages.append({"role": "function", "name": name, "content": result})
    chosen = functions[pick % len(functions)]
    body = {
        "model": MODEL,
        "messages": messages,
        "functions": [{"name": f, "parameters": {"type": "object"}} for f in functions],
        "function_call": {"name": chosen},
    }
    new = normalize_request(body)
    assert new is not None and normalize_request(body) == new  # deterministic
    assert [t["function"]["name"] for t in new["tools"]] == functions
    assert new["tool_choice"]["function"]["name"] == chosen
    # History: every call keeps name+arguments, every result is paired with its call's id.
    sent = new["messages"]
    for k, (name, args, result) in enumerate(history):
        call, tool = sent[1 + 2 * k], sent[2 + 2 * k]
        assert call["tool_calls"][0]["function"] == {"name": name, "arguments": args}
        assert call["tool_calls"][0]["id"] == call_id(1 + 2 * k, name, args)
        assert tool == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": result}

    # Reply: the provider calls `chosen` with `answer`; the legacy client sees exactly that.
    tool_call = {"id": "call_x", "type": "function", "function": {"name": chosen, "arguments": answer}}
    completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                               "finish_reason": "tool_calls"}]}
    legacy = completion_to_legacy(completion)["choices"][0]
    assert legacy["message"]["function_call"] == {"name": chosen, "arguments": answer}
    assert "tool_calls" not in legacy["message"] and legacy["finish_reason"] == "function_call"

    step = max(1, -(-len(answer) // pieces))
    fragments = [answer[i : i + step] for i in range(0, len(answer), step)] or [""]
    chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_x", "type": "function",
                                                                  "function": {"name": chosen, "arguments": ""}}]}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": f}}]}}]}
               for f in fragments]
    mapped = [chunk_to_legacy(c) for c in chunks]
    calls = [m["choices"][0]["delta"]["function_call"] for m in mapped]
    assert "".join(c.get("name", "") for c in calls) == chosen
    assert "".join(c.get("arguments", "") for c in calls) == answer


def test_convert_messages_leaves_modern_histories_alone():
    modern = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert convert_messages(modern) is None
    assert normalize_request({"model": MODEL, "messages": modern, "tools": []}) is None


def test_function_results_pair_by_name_then_order():
    messages = [
        {"role": "assistant", "content": None, "function_call": {"name": "a", "arguments": "{}"}},
        {"role": "function", "name": "other", "content": "1"},
    ]
    converted = convert_messages(messages)
    assert converted[1]["tool_call_id"] == converted[0]["tool_calls"][0]["id"]
    with pytest.raises(ApiError) as info:
        convert_messages([*messages, {"role": "function", "name": "a", "content": "2"}])
    assert info.value.param == "messages[2]"
