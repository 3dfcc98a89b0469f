"""Responses streaming: the event sequence, its typing against the SDK, and failures.

Raw events are read over a plain HTTP client and each is validated with the
SDK's `ResponseStreamEvent` type; the SDK's own stream helpers (strict
validation on) are used as the client too.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from middleware.responses.stream import StreamTranslator, skeleton
from proxy.core.call import SSEEvent
from proxy.devtools.mock_upstream import _fragments
from tests.support import make_settings

MODEL = "sovereign-alpha"
EVENT_ADAPTER = pydantic.TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


@pytest.fixture
async def running(mock, gateway_factory, redis_prefix):
    return await gateway_factory(make_settings(mock.url, store_url="memory://", prefix=redis_prefix, pipeline=["responses"]))


@pytest.fixture
def client(running):
    return running.openai(_strict_response_validation=True)


async def raw_stream(running, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[bytes, list[dict]]:
    """POST a streamed request; return the body bytes and the parsed, validated events."""
    async with aiohttp.ClientSession() as session:
        async with session.post(running.v1 + "/responses", json={"model": MODEL, "stream": True, **body},
                                headers=headers or {}) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            raw = await resp.read()
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1][len("data: "):])
        assert data["type"] == lines[0][len("event: "):]
        EVENT_ADAPTER.validate_python(data)  # every event is a typed SDK event
        events.append(data)
    return raw, events


def check_sequence(events: list[dict]) -> None:
    """Gap-free sequence numbers from 0; output/content indices dense in announcement order."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    announced = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert announced == list(range(len(announced)))
    ids = {e["output_index"]: e["item"]["id"] for e in events if e["type"] == "response.output_item.added"}
    for event in events:
        if "output_index" in event:
            assert event["output_index"] in ids
            assert event.get("item_id", ids[event["output_index"]]) == ids[event["output_index"]]
        if "content_index" in event:
            assert event["content_index"] == 0


async def test_text_stream_event_sequence(running):
    raw, events = await raw_stream(running, {"input": "stream me"}, {"x-mock-chunks": "3"})
    check_sequence(events)
    assert b"[DONE]" not in raw and b"chat.completion" not in raw
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "stream me stream "
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["model"] == MODEL
    assert final["output"][0]["content"][0]["text"] == "stream me stream "
    assert final["usage"]["output_tokens"] == 3
    assert final["id"] == events[0]["response"]["id"]


async def test_reasoning_and_tool_calls_stream(running):
    _, events = await raw_stream(
        running, {"input": "use tools", "tools": [TOOL, {**TOOL, "name": "fetch"}]}, {"x-mock-reasoning-chunks": "2"})
    check_sequence(events)
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "function_call", "function_call"]
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
    assert reasoning == "think think "
    args = {}
    for e in events:
        if e["type"] == "response.function_call_arguments.delta":
            args[e["output_index"]] = args.get(e["output_index"], "") + e["delta"]
    done = {e["output_index"]: e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"}
    assert args == done == {1: '{"q":"value"}', 2: '{"q":"value"}'}
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [(o["type"], o.get("name")) for o in final["output"]] == [
        ("reasoning", None), ("function_call", "lookup"), ("function_call", "fetch")]
    call_ids = [e["item"]["call_id"] for e in events
                if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call"]
    assert [o["call_id"] for o in final["output"][1:]] == call_ids and len(set(call_ids)) == 2
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 2


async def test_sdk_stream_helper_and_final_response(client, mock):
    async with client.responses.stream(model=MODEL, input="hi sdk", instructions="be short") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "hi sdk " * 4
    assert final.status == "completed" and final.instructions == "be short"
    sent = mock.requests[-1]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"][0] == {"role": "system", "content": "be short"}


async def test_sdk_create_stream_with_reasoning(client):
    stream = await client.responses.create(
        model=MODEL, input="why", stream=True, extra_headers={"x-mock-reasoning-chunks": "2"})
    types = [event.type async for event in stream]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.reasoning_summary_part.added"]
    assert "response.reasoning_summary_text.done" in types and types[-1] == "response.completed"


async def test_max_output_tokens_stream_is_incomplete(running):
    _, events = await raw_stream(running, {"input": "long", "max_output_tokens": 2})
    check_sequence(events)
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    item_done = next(e for e in events if e["type"] == "response.output_item.done")
    assert item_done["item"]["status"] == "incomplete"


async def test_mid_stream_failure_gives_error_then_failed(running, mock):
    _, events = await raw_stream(running, {"input": "cut me"}, {"x-mock-cut-after": "2"})
    check_sequence(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "upstream_error"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    # What was produced before the cut is kept, marked incomplete.
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "cut me "
    assert not any(e["type"] == "response.completed" for e in events)


async def test_client_disconnect_closes_provider_stream(running, mock):
    async with aiohttp.ClientSession() as session:
        async with session.post(running.v1 + "/responses", json={"model": MODEL, "stream": True, "input": "slow"},
                                headers={"x-mock-chunks": "200", "x-mock-delay-ms": "20"}) as resp:
            await resp.content.readline()
    for _ in range(100):
        if mock.stats["client_disconnects"]:
            break
        await asyncio.sleep(0.02)
    assert mock.stats["client_disconnects"] == 1 and mock.stats["streams_completed"] == 0


async def test_concurrent_streams_keep_their_own_state(client):
    """Hundreds of interleaved streams: each translator sees only its own chunks."""

    async def one(i: int) -> None:
        async with client.responses.stream(model=MODEL, input=f"word{i}",
                                           extra_headers={"x-mock-chunks": "4", "x-mock-delay-ms": "2"}) as stream:
            final = await stream.get_final_response()
        assert final.output_text == f"word{i} " * 4

    await asyncio.gather(*(one(i) for i in range(200)))


def test_provider_done_without_finish_reason_completes():
    """A provider that ends with [DONE] but never sends finish_reason still completes cleanly."""
    translator = StreamTranslator(skeleton({}, "resp_x", MODEL, [], False))
    list(translator.start())
    list(translator.chunk({"choices": [{"index": 0, "delta": {"content": "hi"}}]}))
    translator.saw_done = SSEEvent(b"data: [DONE]\n\n").is_done
    events = [event.json() for event in translator.finish()]
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "hi"


def test_a_call_named_in_a_later_fragment_keeps_its_name():
    """Some providers send a tool call's id first and its name in the next fragment."""
    translator = StreamTranslator(skeleton({}, "resp_x", MODEL, [], False))
    list(translator.start())
    for fragment in [{"index": 0, "id": "call_1", "function": {"arguments": ""}},
                     {"index": 0, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]:
        list(translator.chunk({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]}))
    list(translator.chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    events = [event.json() for event in translator.finish()]
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["name"] == "get_weather"
    (call,) = events[-1]["response"]["output"]
    assert (call["type"], call["call_id"], call["name"], call["arguments"]) == (
        "function_call", "call_1", "get_weather", '{"city": "Paris"}')


async def test_leaving_at_the_opening_events_closes_the_chat_stream():
    """A client gone at `response.created` must still close what lies beneath (provider, metering)."""
    import asyncio as _asyncio

    from middleware.responses.unit import ResponsesUnit
    from middleware.responses.stream import skeleton

    class ChatStream:
        closed = False

        def __aiter__(self):
            return self

        async def __anext__(self):
            await _asyncio.sleep(10)
            raise StopAsyncIteration

        async def aclose(self):
            ChatStream.closed = True

    unit = ResponsesUnit.__new__(ResponsesUnit)  # _translate needs only its reasoning setting until the end
    unit.settings = ResponsesUnit.Settings()
    response = skeleton({"input": "hi"}, "resp_test", "sovereign-alpha", [], False)
    events = unit._translate(ChatStream(), response, "tenant", [], [])
    first = await events.__anext__()
    assert b"response.created" in first.raw
    await events.aclose()
    assert ChatStream.closed


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_cap_inside_the_second_call_marks_that_call_incomplete_and_keeps_the_first(running, client, stream):
    """Only the item being generated when the cap hit is incomplete: the call before it is whole."""
    other = {**TOOL, "name": "lookup_again"}
    whole = await client.responses.create(model=MODEL, input="two calls", tools=[TOOL, other])
    first = whole.output[0].arguments
    # The simulated provider spends a token on a call's name and one per argument fragment:
    # the first call whole, then the second's name and nothing of its arguments.
    cap = 1 + len(_fragments(first)) + 1
    body = {"input": "two calls", "tools": [TOOL, other], "max_output_tokens": cap}
    if stream:
        _, events = await raw_stream(running, body)
        check_sequence(events)
        final = events[-1]["response"]
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        assert [(i["name"], i["status"]) for i in done] == [("lookup", "completed"), ("lookup_again", "incomplete")]
    else:
        final = (await client.responses.create(model=MODEL, **body)).model_dump()
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    calls = [(i["name"], i["arguments"], i["status"]) for i in final["output"]]
    assert calls == [("lookup", first, "completed"), ("lookup_again", "", "incomplete")]
