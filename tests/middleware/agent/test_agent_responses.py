"""Agent mode on the Responses API: server tool calls as `mcp_call` items and `response.mcp_call.*` events.

Everything the gateway sends is parsed by the official `openai` SDK's typed
models (the SDK's own parsing of `responses.create` and its event stream).
"""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.responses import (
    ResponseMcpCallArgumentsDoneEvent,
    ResponseMcpCallCompletedEvent,
    ResponseMcpCallFailedEvent,
    ResponseMcpCallInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
)
from openai.types.responses.response_output_item import McpCall

from tests.middleware.agent.support import (
    AGENT,
    ScriptedProvider,
    agent_config,
    text_completion,
    tool_call_completion,
)
from tests.support import provider as bare_provider

PIPELINE = ["validation", "responses", "agent"]


def weather_and_broken(body, n):
    if n == 1:
        return tool_call_completion([("call_w", "weather", {"city": "Bergen"}), ("call_b", "broken", {"reason": "no"})])
    return text_completion("Rainy in Bergen.")


async def test_json_response_has_mcp_call_items_before_the_message(mcp_http, agent_gateway):
    provider = ScriptedProvider(weather_and_broken)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        client = running.openai()
        response = await client.responses.create(model=AGENT, input="Weather in Bergen?")
        stored = await client.responses.retrieve(response.id)
    kinds = [item.type for item in response.output]
    assert kinds == ["mcp_call", "mcp_call", "message"]
    weather, broken, message = response.output
    assert isinstance(weather, McpCall) and isinstance(broken, McpCall) and isinstance(message, ResponseOutputMessage)
    assert (weather.server_label, weather.name, json.loads(weather.arguments)) == ("tools", "weather", {"city": "Bergen"})
    assert weather.output == "sunny and 21 degrees in Bergen" and weather.error is None and weather.status == "completed"
    assert broken.output is None and broken.status == "failed"
    assert broken.error.type == "mcp_tool_execution_error"
    assert response.output_text == "Rainy in Bergen."
    assert [item.type for item in stored.output] == kinds
    # The provider never saw an mcp tool; it saw function tools and, next, the results.
    assert all(t["type"] == "function" for t in provider.requests[0]["tools"])
    assert [m["tool_call_id"] for m in provider.requests[1]["messages"] if m["role"] == "tool"] == ["call_w", "call_b"]


async def test_stream_events_are_valid_for_the_sdk(mcp_http, agent_gateway):
    provider = ScriptedProvider(weather_and_broken)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        client = running.openai()
        events = []
        async with client.responses.stream(model=AGENT, input="Weather in Bergen?") as stream:
            async for event in stream:
                events.append(event)
            final = await stream.get_final_response()
    types = [e.type for e in events]
    mcp_events = [e for e in events if e.type.startswith("response.mcp_call")]
    assert [type(e) for e in mcp_events] == [
        ResponseMcpCallInProgressEvent, ResponseMcpCallArgumentsDoneEvent,
        ResponseMcpCallInProgressEvent, ResponseMcpCallArgumentsDoneEvent,
        ResponseMcpCallCompletedEvent, ResponseMcpCallFailedEvent,
    ]
    added = [e for e in events if isinstance(e, ResponseOutputItemAddedEvent)]
    done = [e for e in events if isinstance(e, ResponseOutputItemDoneEvent)]
    assert [e.item.type for e in added] == ["mcp_call", "mcp_call", "message"]
    assert [e.output_index for e in added] == [0, 1, 2]
    assert [(e.item.type, getattr(e.item, "status", None)) for e in done][:2] == [("mcp_call", "completed"), ("mcp_call", "failed")]
    assert done[0].item.output == "sunny and 21 degrees in Bergen"
    # Every mcp_call event comes before the answer's text.
    assert max(types.index(e.type) for e in mcp_events) < types.index("response.output_text.delta")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[-1] == "response.completed"
    assert [item.type for item in final.output] == ["mcp_call", "mcp_call", "message"]
    assert final.output_text == "Rainy in Bergen."


async def test_client_mcp_tool_is_accepted_only_for_a_configured_label(mcp_http, agent_gateway):
    hits = []

    async def elsewhere(request):  # the client's server_url: must never be contacted
        hits.append(request.path)
        raise AssertionError("contacted")

    provider = ScriptedProvider(lambda body, n: tool_call_completion([("c1", "add", {"a": 1, "b": 2})]) if n == 1 else text_completion("3"))
    async with provider.serve() as url, bare_provider(elsewhere) as other_url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        client = running.openai()
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(
                model=AGENT, input="1+2?", tools=[{"type": "mcp", "server_label": "elsewhere", "server_url": other_url}]
            )
        assert refused.value.body["param"] == "tools[0].server_label"
        with pytest.raises(openai.BadRequestError):  # an ordinary model takes no mcp tools
            await client.responses.create(
                model="sovereign-alpha", input="1+2?", tools=[{"type": "mcp", "server_label": "tools", "server_url": other_url}]
            )
        response = await client.responses.create(
            model=AGENT, input="1+2?",
            tools=[{"type": "mcp", "server_label": "tools", "server_url": other_url, "allowed_tools": ["add"],
                    "require_approval": "never", "headers": {"Authorization": "Bearer client-secret"}}],
        )
    assert hits == []
    assert [item.type for item in response.output] == ["mcp_call", "message"]
    # allowed_tools narrowed what the model was offered; the echoed tool keeps no headers.
    assert [t["function"]["name"] for t in provider.requests[0]["tools"]] == ["add"]
    assert response.tools[0].type == "mcp" and response.tools[0].headers is None


async def test_its_mcp_calls_go_back_as_history_as_input_and_by_chain(mcp_http, agent_gateway):
    """Agent frameworks send a Response's output back as input: `mcp_call` items used to be a 400, and
    previous_response_id dropped them, so the model lost the calls it had made and their results."""
    provider = ScriptedProvider(lambda body, n: weather_and_broken(body, n) if n == 1 else text_completion("Rainy in Bergen."))
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        client = running.openai()
        first = await client.responses.create(model=AGENT, input="Weather in Bergen?")
        weather, broken, _ = first.output
        history = [
            {"role": "user", "content": "Weather in Bergen?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": weather.id, "type": "function", "function": {"name": "weather", "arguments": weather.arguments}}]},
            {"role": "tool", "tool_call_id": weather.id, "content": "sunny and 21 degrees in Bergen"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": broken.id, "type": "function", "function": {"name": "broken", "arguments": broken.arguments}}]},
            {"role": "tool", "tool_call_id": broken.id, "content": provider.requests[1]["messages"][-1]["content"]},
            {"role": "assistant", "content": "Rainy in Bergen."},
            {"role": "user", "content": "And tomorrow?"},
        ]
        assert history[4]["content"].startswith("error: ")  # what the model was given for the failed call
        sent_back = [{"role": "user", "content": "Weather in Bergen?"},
                     *(item.model_dump(exclude_none=True) for item in first.output), {"role": "user", "content": "And tomorrow?"}]
        await client.responses.create(model=AGENT, input=sent_back)
        assert provider.requests[-1]["messages"] == history
        await client.responses.create(model=AGENT, previous_response_id=first.id, input="And tomorrow?")
        assert provider.requests[-1]["messages"] == history
