"""Reasoning items in each `units.responses.reasoning` mode: summary (default), text, both.

The provider's `reasoning_content` must reach clients in the shape they parse:
summary parts and `response.reasoning_summary_*` events (Agents SDK,
LangChain, Vercel AI SDK) or reasoning_text content and
`response.reasoning_text.*` events (the spec's raw chain of thought). Every
streamed event is validated against the official SDK's `ResponseStreamEvent`,
and the SDK's own stream parser is a client too.
"""

from __future__ import annotations

import json

import aiohttp
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from proxy.core.gateway import Gateway
from proxy.core.settings import ConfigError
from tests.support import make_settings

MODEL = "sovereign-alpha"
EVENT_ADAPTER = pydantic.TypeAdapter(ResponseStreamEvent)
THINK = {"x-mock-reasoning-chunks": "3"}
REASONING = "think " * 3


async def gateway(mock, gateway_factory, mode: str | None):
    units = {"responses": {"reasoning": mode}} if mode else {}
    return await gateway_factory(make_settings(mock.url, pipeline=["responses"], units=units))


async def stream_events(running, body: dict) -> list[dict]:
    """A raw streamed request's events, each validated as a typed SDK event."""
    async with aiohttp.ClientSession() as session:
        async with session.post(running.v1 + "/responses", json={"model": MODEL, "stream": True, **body},
                                headers=THINK) as resp:
            assert resp.status == 200
            raw = await resp.text()
    events = []
    for block in filter(None, raw.split("\n\n")):
        data = json.loads(block.split("\n")[1][len("data: "):])
        EVENT_ADAPTER.validate_python(data)
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def reasoning_events(events: list[dict]) -> list[str]:
    return [e["type"] for e in events if e.get("output_index") == 0 and e["type"] != "response.output_item.added"]


SUMMARY_EVENTS = ["response.reasoning_summary_part.added", *["response.reasoning_summary_text.delta"] * 3,
                  "response.reasoning_summary_text.done", "response.reasoning_summary_part.done"]
TEXT_EVENTS = ["response.content_part.added", *["response.reasoning_text.delta"] * 3,
               "response.reasoning_text.done", "response.content_part.done"]


async def test_default_is_summary(mock, gateway_factory):
    running = await gateway(mock, gateway_factory, None)
    client = running.openai(_strict_response_validation=True)
    response = await client.responses.create(model=MODEL, input="why", extra_headers=THINK)
    item = response.output[0]
    assert [(s.type, s.text) for s in item.summary] == [("summary_text", REASONING)] and item.content is None

    events = await stream_events(running, {"input": "why"})
    assert reasoning_events(events) == [*SUMMARY_EVENTS, "response.output_item.done"]
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["summary"] == [] and "content" not in added["item"]
    deltas = [e for e in events if e["type"] == "response.reasoning_summary_text.delta"]
    assert "".join(e["delta"] for e in deltas) == REASONING and {e["summary_index"] for e in deltas} == {0}
    done = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert done["summary"] == [{"type": "summary_text", "text": REASONING}] and done["status"] == "completed"

    # The SDK's stream parser and accumulated final response agree.
    async with client.responses.stream(model=MODEL, input="why", extra_headers=THINK) as stream:
        summary = "".join([e.delta async for e in stream if e.type == "response.reasoning_summary_text.delta"])
        final = await stream.get_final_response()
    assert summary == final.output[0].summary[0].text == REASONING


async def test_text_mode(mock, gateway_factory):
    running = await gateway(mock, gateway_factory, "text")
    client = running.openai(_strict_response_validation=True)
    response = await client.responses.create(model=MODEL, input="why", extra_headers=THINK)
    item = response.output[0]
    assert item.summary == [] and [(c.type, c.text) for c in item.content] == [("reasoning_text", REASONING)]
    events = await stream_events(running, {"input": "why"})
    assert reasoning_events(events) == [*TEXT_EVENTS, "response.output_item.done"]


async def test_both_mode(mock, gateway_factory):
    running = await gateway(mock, gateway_factory, "both")
    client = running.openai(_strict_response_validation=True)
    response = await client.responses.create(model=MODEL, input="why", extra_headers=THINK)
    item = response.output[0]
    assert item.summary[0].text == item.content[0].text == REASONING
    events = await stream_events(running, {"input": "why"})
    assert reasoning_events(events) == [
        "response.reasoning_summary_part.added", "response.content_part.added",
        *["response.reasoning_summary_text.delta", "response.reasoning_text.delta"] * 3,
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done"]
    done = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert done["summary"][0]["text"] == done["content"][0]["text"] == REASONING


@pytest.mark.parametrize("mode", ["summary", "text", "both"])
async def test_reasoning_items_fed_back_as_input(mock, gateway_factory, mode):
    """A client that sends the earlier output back in full (reasoning included) keeps working."""
    running = await gateway(mock, gateway_factory, mode)
    client = running.openai(_strict_response_validation=True)
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    first = await client.responses.create(model=MODEL, input="go", tools=[tool], extra_headers=THINK)
    reasoning, call = first.output
    second = await client.responses.create(model=MODEL, tools=[tool], input=[
        {"role": "user", "content": "go"},
        reasoning.model_dump(exclude_none=True),
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "42"},
    ])
    assert second.output_text == "Done: f returned 42 "
    sent = mock.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]  # no reasoning reached the provider


def test_bad_mode_fails_at_start_naming_the_field(mock):
    settings = make_settings(mock.url, pipeline=["responses"], units={"responses": {"reasoning": "raw"}})
    with pytest.raises(ConfigError) as info:
        Gateway(settings)
    assert "units.responses.reasoning" in str(info.value)
