"""Agent mode on chat completions: the tool loop against a real MCP server, JSON and streamed.

Client: the official `openai` SDK. Provider: a scripted one that records every
request, so each test asserts what the gateway really sent it.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import anthropic
import pytest
from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled

from tests.middleware.agent.support import (
    AGENT,
    USAGE,
    ScriptedProvider,
    agent_config,
    text_completion,
    tool_call_completion,
)
from tests.support import until

set_tracing_disabled(True)  # the Agents SDK would otherwise export traces to OpenAI

PIPELINE = ["validation", "legacy_functions", "agent"]
QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]


def weather_then_answer(body, n):
    if n == 1:
        return tool_call_completion([("call_w1", "weather", {"city": "Oslo"})])
    return text_completion("It is sunny in Oslo.")


def tool_messages(body):
    return [m for m in body["messages"] if m["role"] == "tool"]


async def test_json_runs_the_tool_and_returns_only_the_final_answer(mcp_http, agent_gateway):
    provider = ScriptedProvider(weather_then_answer)
    before = len(mcp_http.calls())
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        reply = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
    assert reply.choices[0].message.content == "It is sunny in Oslo."
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    # Usage is the loop's: two provider calls.
    assert reply.usage.prompt_tokens == 2 * USAGE["prompt_tokens"]
    assert reply.usage.completion_tokens == 2 * USAGE["completion_tokens"]
    # The MCP server ran exactly the call the model asked for.
    assert [c for c in mcp_http.calls()[before:]] == [{"tool": "weather", "arguments": {"city": "Oslo"}, "pid": mcp_http.proc.pid}]
    first, second = provider.requests
    offered = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert offered["weather"]["parameters"]["properties"]["city"]["type"] == "string"
    assert offered["weather"]["description"] == "The weather in a city."
    assert "tool_choice" not in first
    # The second request carries the assistant's call and the tool's result.
    assert second["messages"][:1] == QUESTION
    assert second["messages"][1]["tool_calls"][0]["id"] == "call_w1"
    assert tool_messages(second) == [{"role": "tool", "tool_call_id": "call_w1", "content": "sunny and 21 degrees in Oslo"}]


async def test_stream_shows_the_tool_call_before_the_answer(mcp_http, agent_gateway):
    provider = ScriptedProvider(weather_then_answer)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}, show_tool_calls=True))
        client = running.openai()
        order = []
        async with client.chat.completions.stream(
            model=AGENT, messages=QUESTION, stream_options={"include_usage": True}
        ) as stream:
            async for event in stream:
                if event.type == "tool_calls.function.arguments.delta":
                    order.append(("tool", event.name, event.arguments))
                elif event.type == "content.delta" and event.delta:
                    order.append(("text", event.delta))
            final = await stream.get_final_completion()
    assert order[0] == ("tool", "weather", json.dumps({"city": "Oslo"}))
    assert "".join(part[1] for part in order[1:]) == "It is sunny in Oslo."
    message = final.choices[0].message
    assert message.content == "It is sunny in Oslo."
    assert [c.function.name for c in message.tool_calls] == ["weather"]
    assert final.choices[0].finish_reason == "stop"
    assert final.usage.total_tokens == 2 * USAGE["total_tokens"]
    assert provider.requests[1]["stream"] is True
    assert tool_messages(provider.requests[1])[0]["content"] == "sunny and 21 degrees in Oslo"


async def test_raw_stream_has_one_done_and_the_agent_api_delta_shape(mcp_http, agent_gateway):
    provider = ScriptedProvider(weather_then_answer)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}, show_tool_calls=True))
        async with aiohttp.ClientSession() as http:
            async with http.post(running.v1 + "/chat/completions", json={"model": AGENT, "messages": QUESTION, "stream": True}) as r:
                text = await r.text()
    datas = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert datas.count("[DONE]") == 1 and datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    call_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(call_chunks) == 1
    assert call_chunks[0]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_w1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    ]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finishes == ["stop"]
    assert len({c["id"] for c in chunks}) == 1  # one answer, one id


async def test_by_default_server_calls_stay_out_of_the_stream_so_sdks_do_not_run_them(mcp_http, agent_gateway):
    """Shown calls (the default before) were accumulated by the SDK's stream helper into the final message,
    and the Agents SDK's streamed chat runner then failed with "Tool weather not found"; and every provider
    call's first chunk carried `role`, which the SDK concatenated ("assistantassistant")."""
    def each_request_calls_the_tool(body, n):
        if not tool_messages(body):
            return tool_call_completion([(f"call_w{n}", "weather", {"city": "Oslo"})])
        return text_completion("It is sunny in Oslo.")

    provider = ScriptedProvider(each_request_calls_the_tool)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        stream = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION, stream=True)
        chunks = [chunk async for chunk in stream]
        async with running.openai().chat.completions.stream(model=AGENT, messages=QUESTION) as helper:
            final = await helper.get_final_completion()

        agent = Agent(name="a", instructions="Answer.", model=OpenAIChatCompletionsModel(model=AGENT, openai_client=running.openai()))
        result = Runner.run_streamed(agent, "Weather in Oslo?", max_turns=2)
        async for _ in result.stream_events():
            pass
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is sunny in Oslo."
    assert [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role] == ["assistant"]
    message = final.choices[0].message
    assert (message.role, message.content, message.tool_calls) == ("assistant", "It is sunny in Oslo.", None)
    assert result.final_output == "It is sunny in Oslo."
    assert len(provider.requests) == 6  # two provider calls per request: each ran the server tool once


@pytest.mark.parametrize("stream", [False, True])
async def test_a_model_that_keeps_calling_tools_stops_at_max_iterations(mcp_http, agent_gateway, stream):
    def always_tools(body, n):
        if body.get("tool_choice") == "none":
            return text_completion("I give up.")
        return tool_call_completion([(f"call_{n}", "add", {"a": n, "b": 1})])

    provider = ScriptedProvider(always_tools)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}, max_iterations=3))
        client = running.openai()
        if stream:
            chunks = [c async for c in await client.chat.completions.create(model=AGENT, messages=QUESTION, stream=True)]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = (await client.chat.completions.create(model=AGENT, messages=QUESTION)).choices[0].message.content
    assert text == "I give up."
    assert len(provider.requests) == 3
    assert [r.get("tool_choice") for r in provider.requests] == [None, None, "none"]
    # Each call saw the results of all earlier ones.
    assert [m["content"] for m in tool_messages(provider.requests[2])] == ["2", "3"]


async def test_a_failing_tool_becomes_an_error_tool_message(mcp_http, agent_gateway):
    def broken_then_answer(body, n):
        if n == 1:
            return tool_call_completion([("call_b", "broken", {"reason": "disk full"}), ("call_x", "weather", {"town": 1})])
        return text_completion("Sorry, that failed.")

    provider = ScriptedProvider(broken_then_answer)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        reply = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
        async with aiohttp.ClientSession() as http, http.get(running.base_url + "/metrics") as metrics:
            exposition = await metrics.text()
    assert reply.choices[0].message.content == "Sorry, that failed."
    results = {m["tool_call_id"]: m["content"] for m in tool_messages(provider.requests[1])}
    assert results["call_b"].startswith("error: ")
    assert results["call_x"].startswith("error: ")  # arguments the tool's schema refuses
    assert 'sovereign_tool_calls_total{outcome="error",server="tools",tool="broken"} 1.0' in exposition
    assert 'sovereign_tool_call_duration_seconds_count{server="tools"} 2.0' in exposition


async def test_a_tool_that_times_out_becomes_an_error_tool_message(mcp_http, agent_gateway):
    def slow_then_answer(body, n):
        return tool_call_completion([("call_s", "slow", {"seconds": 3})]) if n == 1 else text_completion("too slow")

    provider = ScriptedProvider(slow_then_answer)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url, "timeout_seconds": 0.5}}))
        reply = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
    assert reply.choices[0].message.content == "too slow"
    assert tool_messages(provider.requests[1])[0]["content"] == "error: the tool did not answer within 0.5 seconds"


async def test_results_are_cut_at_max_result_bytes(mcp_http, agent_gateway):
    def big_then_answer(body, n):
        return tool_call_completion([("call_big", "big", {"size": 5000})]) if n == 1 else text_completion("ok")

    provider = ScriptedProvider(big_then_answer)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url, "max_result_bytes": 100}}))
        await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
    content = tool_messages(provider.requests[1])[0]["content"]
    assert content.startswith("x" * 100) and "x" * 101 not in content
    assert "truncated" in content


async def test_a_client_tool_call_ends_the_loop_and_goes_to_the_client(mcp_http, agent_gateway):
    client_tool = {"type": "function", "function": {"name": "open_door", "parameters": {"type": "object", "properties": {}}}}

    def client_call(body, n):
        return tool_call_completion([("call_c", "open_door", {})])

    provider = ScriptedProvider(client_call)
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        reply = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION, tools=[client_tool])
    assert len(provider.requests) == 1
    assert {t["function"]["name"] for t in provider.requests[0]["tools"]} >= {"open_door", "weather"}
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["open_door"]


async def test_ordinary_models_pass_through_untouched(mcp_http, agent_gateway):
    provider = ScriptedProvider(lambda body, n: text_completion("plain"))
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}))
        reply = await running.openai().chat.completions.create(model="sovereign-alpha", messages=QUESTION)
    assert reply.choices[0].message.content == "plain"
    assert provider.requests == [{"model": "mock-model", "messages": QUESTION}]


async def test_client_disconnect_mid_loop_stops_further_provider_calls(mcp_http, agent_gateway):
    def slow_tool(body, n):
        return tool_call_completion([("call_s", "slow", {"seconds": 1.0})]) if n == 1 else text_completion("late")

    provider = ScriptedProvider(slow_tool)
    before = len(mcp_http.calls())
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": mcp_http.url}}, show_tool_calls=True))
        async with aiohttp.ClientSession() as http:
            response = await http.post(running.v1 + "/chat/completions", json={"model": AGENT, "messages": QUESTION, "stream": True})
            async for line in response.content:
                if b"tool_calls" in line:
                    break  # the slow call has started
            await until(lambda: len(mcp_http.calls()) > before, timeout=5)
            response.close()  # the client goes away while the tool runs
        await until(lambda: running.gateway.in_flight == 0, timeout=5)
        # Past the tool's own second: a loop still running would have called the provider again by now
        # (there is no event for "something did not happen").
        await asyncio.sleep(1.5)
        assert len(provider.requests) == 1
        # The MCP session outlives the cancelled call: the next request's tool runs on it.
        provider.requests.clear()
        provider.script = weather_then_answer
        reply = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
    assert reply.choices[0].message.content == "It is sunny in Oslo."
    assert tool_messages(provider.requests[1])[0]["content"] == "sunny and 21 degrees in Oslo"
    assert running.gateway.unit("agent").servers["tools"].connections == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_through_the_simulated_provider(mock, mcp_http, agent_gateway, stream):
    """The shipped mock provider calls every offered tool until told `tool_choice: "none"`."""
    servers = {"tools": {"url": mcp_http.url, "tools": ["weather", "add"]}}
    running = await agent_gateway(mock.url, pipeline=PIPELINE, **agent_config(servers, max_iterations=2, show_tool_calls=True))
    before = len(mcp_http.calls())
    client = running.openai()
    if stream:
        chunks = [c async for c in await client.chat.completions.create(model=AGENT, messages=QUESTION, stream=True)]
        shown = [c.choices[0].delta.tool_calls[0].function.name for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert sorted(shown) == ["add", "weather"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    else:
        reply = await client.chat.completions.create(model=AGENT, messages=QUESTION)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
    assert text
    assert sorted(c["tool"] for c in mcp_http.calls()[before:]) == ["add", "weather"]


@pytest.mark.parametrize("after", [1, 4], ids=["inside the tool call", "after its arguments"])
async def test_a_providers_error_event_ends_the_loop_like_a_plain_stream(mock, mcp_http, agent_gateway, after):
    """One `data: {"error"}` event and the stream ends: no tool runs on a broken turn, no second call, no [DONE]."""
    servers = {"tools": {"url": mcp_http.url, "tools": ["weather"]}}
    running = await agent_gateway(mock.url, pipeline=PIPELINE, **agent_config(servers, max_iterations=3))
    before_tools, before_calls = len(mcp_http.calls()), len(mock.requests)
    async with aiohttp.ClientSession() as http:
        async with http.post(running.v1 + "/chat/completions", headers={"x-mock-error-after": str(after)},
                             json={"model": AGENT, "messages": QUESTION, "stream": True}) as response:
            body = (await response.read()).decode()
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert [e for e in events if '"error"' in e] == events[-1:]  # one error event, the last one
    assert "[DONE]" not in events
    assert len(mock.requests) - before_calls == 1 and len(mcp_http.calls()) == before_tools


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_on_the_messages_api_the_servers_calls_are_not_shown_as_the_clients_tool_use(mock, mcp_http, agent_gateway, stream):
    """An Anthropic client takes every `tool_use` block as its own to run: the server's calls stay hidden."""
    servers = {"tools": {"url": mcp_http.url, "tools": ["weather"]}}
    running = await agent_gateway(mock.url, pipeline=["messages", *PIPELINE], **agent_config(servers, max_iterations=2))
    before = len(mcp_http.calls())
    async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key="sk-sov-live-none", max_retries=0) as client:
        if stream:
            async with client.messages.stream(model=AGENT, max_tokens=200, messages=QUESTION) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(model=AGENT, max_tokens=200, messages=QUESTION)
    assert [block.type for block in message.content] == ["text"] and message.stop_reason == "end_turn"
    assert [c["tool"] for c in mcp_http.calls()[before:]] == ["weather"]  # the server ran it
