"""Tests for proxy.devtools.mock_upstream: the simulated chat-completions provider.

Everything goes through a real socket. The official ``openai`` SDK checks that replies
parse as OpenAI's types; raw aiohttp is used where bytes, timing or broken streams matter.
Covers JSON and SSE replies, usage, output caps, tool calls, reasoning, failures, broken
streams, disconnect accounting, pacing, auth, header overrides, the /_mock endpoints and
the CLI/process entry points.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.devtools.mock_upstream import MockOptions, MockUpstream, add_cli_arguments, options_from_args

USER = [{"role": "user", "content": "alpha beta gamma"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
async def mock() -> AsyncIterator[tuple[MockUpstream, str]]:
    upstream = MockUpstream(MockOptions(chunks=4))
    url = await upstream.start()
    yield upstream, url
    await upstream.close()


@pytest.fixture
async def client(mock: tuple[MockUpstream, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=mock[1], api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


def sse_events(raw: bytes) -> list[Any]:
    """Split an SSE body into decoded JSON events ("[DONE]" kept as the string)."""
    events = []
    for block in raw.split(b"\n\n"):
        if block:
            assert block.startswith(b"data: ")
            data = block[len(b"data: ") :]
            events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events


def strip_ids(events: list[Any]) -> list[Any]:
    return [{k: v for k, v in e.items() if k not in ("id", "created")} if isinstance(e, dict) else e for e in events]


async def post_raw(url: str, body: dict[str, Any], **headers: str) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/chat/completions", json=body, headers=headers) as resp:
            return resp, await resp.read()


async def wait_for(predicate: Any, timeout: float = 2.0) -> None:
    """Poll until ``predicate()`` holds: server-side bookkeeping finishes after the client returns."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_json_reply_and_recorded_request(mock: tuple[MockUpstream, str], client: openai.AsyncOpenAI) -> None:
    upstream, _ = mock
    reply = await client.chat.completions.create(model="m1", messages=USER)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-mock-")
    assert reply.model == "m1"
    choice = reply.choices[0]
    assert choice.message.content == "alpha beta gamma alpha "  # 4 chunks echoing the user words
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    [recorded] = upstream.requests
    assert recorded["path"] == "/v1/chat/completions"
    assert recorded["headers"]["authorization"] == "Bearer x"
    assert recorded["body"]["messages"] == USER
    assert upstream.stats["requests"] == 1 and upstream.stats["streams_started"] == 0


async def test_stream_with_include_usage_bytes(mock: tuple[MockUpstream, str]) -> None:
    upstream, url = mock
    body = {"model": "m1", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    resp, raw = await post_raw(url, body)
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "alpha beta gamma alpha "
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert upstream.stats["streams_started"] == upstream.stats["streams_completed"] == 1
    # Deterministic: an identical request gives the same events apart from id/created.
    _, again = await post_raw(url, body)
    assert strip_ids(sse_events(again)) == strip_ids(events)


async def test_output_cap_gives_length(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    stream = await client.chat.completions.create(
        model="m", messages=USER, max_completion_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 3


async def test_n_choices(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="m", messages=USER, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 1
    assert reply.usage.completion_tokens == 12


async def test_parallel_tool_calls_json(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert orjson.loads(calls[0].function.arguments) == {"city": "value", "days": 1}
    assert calls[1].function.arguments == "{}"
    # Deterministic: the same request gives the same ids.
    again = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK])
    assert [c.id for c in again.choices[0].message.tool_calls] == [c.id for c in calls]


async def test_parallel_tool_calls_streamed(client: openai.AsyncOpenAI) -> None:
    # The SDK's stream helper reassembles tool-call fragments exactly as it does for OpenAI.
    async with client.chat.completions.stream(model="m", messages=USER, tools=[WEATHER, CLOCK]) as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name) for c in calls] == [("function", "get_weather"), ("function", "get_time")]
    assert orjson.loads(calls[0].function.arguments) == {"city": "value", "days": 1}
    # The same ids as the JSON reply to the same conversation.
    reply = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK])
    assert [c.id for c in calls] == [c.id for c in reply.choices[0].message.tool_calls]


async def test_tool_choice_and_parallel_false(client: openai.AsyncOpenAI) -> None:
    named = await client.chat.completions.create(
        model="m", messages=USER, tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    single = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK], parallel_tool_calls=False)
    assert [c.function.name for c in single.choices[0].message.tool_calls] == ["get_weather"]
    text = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER], tool_choice="none")
    assert text.choices[0].message.content and not text.choices[0].message.tool_calls


def after_tool_results(reply: Any) -> list[dict[str, Any]]:
    """USER, the assistant turn of `reply` (tool calls) and one result per call."""
    calls = reply.choices[0].message.tool_calls
    assistant = {"role": "assistant", "content": None,
                 "tool_calls": [c.model_dump(include={"id", "type", "function"}) for c in calls]}
    results = [{"role": "tool", "tool_call_id": c.id, "content": f'{{"n": {k}}}'} for k, c in enumerate(calls)]
    return [*USER, assistant, *results]


async def test_tool_results_get_a_text_answer(client: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK])
    messages = after_tool_results(first)
    reply = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER, CLOCK])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == 'Done: get_weather returned {"n": 0}; get_time returned {"n": 1} '
    assert reply.usage.completion_tokens == len(choice.message.content.split())
    # Streamed: the same words, chunk by chunk.
    async with client.chat.completions.stream(model="m", messages=messages, tools=[WEATHER, CLOCK]) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == choice.message.content
    # A new user turn after the results starts the next tool call, with new ids.
    follow_up = [*messages, {"role": "assistant", "content": choice.message.content},
                 {"role": "user", "content": "again"}]
    again = await client.chat.completions.create(model="m", messages=follow_up, tools=[WEATHER, CLOCK])
    new_ids = {c.id for c in again.choices[0].message.tool_calls}
    assert len(new_ids) == 2 and not new_ids & {c.id for c in first.choices[0].message.tool_calls}
    # A forced tool choice still calls a tool after results.
    forced = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], tool_choice="required")
    assert forced.choices[0].finish_reason == "tool_calls"


async def test_output_cap_holds_for_tool_calls(client: openai.AsyncOpenAI) -> None:
    # get_weather is 1 head + 3 argument fragments = 4 tokens; get_time ("{}") 1 + 2.
    whole = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK], max_tokens=7)
    assert whole.choices[0].finish_reason == "tool_calls" and whole.usage.completion_tokens == 7
    cut = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK], max_tokens=3)
    choice = cut.choices[0]
    assert choice.finish_reason == "length" and cut.usage.completion_tokens == 3
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and len(call.function.arguments) < len('{"city":"value","days":1}')
    stream = await client.chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK], max_completion_tokens=3,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 3
    # The cap also cuts the answer to tool results.
    answer = await client.chat.completions.create(model="m", messages=after_tool_results(whole), max_tokens=2)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content == "Done: get_weather "


async def test_reasoning_content(mock: tuple[MockUpstream, str], client: openai.AsyncOpenAI) -> None:
    mock[0].options.reasoning_chunks = 2
    reply = await client.chat.completions.create(model="m", messages=USER)
    assert reply.choices[0].message.reasoning_content == "think think "  # extra field kept by the SDK
    assert reply.usage.completion_tokens == 6 and reply.usage.completion_tokens_details.reasoning_tokens == 2
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    deltas = [c.choices[0].delta async for c in stream]
    reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    assert reasoning == ["think ", "think "]
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(getattr(d, "reasoning_content", None) is None for d in deltas[first_content:])


async def test_fail_status_gives_typed_errors(mock: tuple[MockUpstream, str], client: openai.AsyncOpenAI) -> None:
    mock[0].options.fail_status = 503
    with pytest.raises(openai.InternalServerError) as server_error:
        await client.chat.completions.create(model="m", messages=USER)
    assert server_error.value.status_code == 503 and server_error.value.code == "mock_failure"
    with pytest.raises(openai.RateLimitError) as rate_error:
        await client.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-fail-status": "429"})
    assert rate_error.value.type == "invalid_request_error"


async def test_validation_errors(mock: tuple[MockUpstream, str]) -> None:
    resp, raw = await post_raw(mock[1], {"model": "m"})
    assert resp.status == 400 and orjson.loads(raw)["error"]["param"] == "messages"
    resp, raw = await post_raw(mock[1], {"model": "m", "messages": USER}, **{"x-mock-chunks": "many"})
    assert resp.status == 400 and orjson.loads(raw)["error"]["type"] == "invalid_request_error"


async def test_cut_after_breaks_stream(mock: tuple[MockUpstream, str], client: openai.AsyncOpenAI) -> None:
    upstream, url = mock
    upstream.options.cut_after = 2
    received = b""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/chat/completions", json={"model": "m", "messages": USER, "stream": True}) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for line in resp.content:
                    received += line
    events = sse_events(received)
    assert "[DONE]" not in events
    assert [e["choices"][0]["delta"].get("content") for e in events] == ["", "alpha ", "beta "]
    # The SDK reports the broken chunked body as a connection error after the delivered chunks.
    stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "alpha ", "beta "]
    assert upstream.stats["streams_completed"] == 0 and upstream.stats["client_disconnects"] == 0


async def test_client_disconnect_is_counted(mock: tuple[MockUpstream, str]) -> None:
    upstream, url = mock
    body = {"model": "m", "messages": USER, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{url}/chat/completions", json=body, headers={"x-mock-chunks": "50", "x-mock-delay-ms": "20"})
        await resp.content.readuntil(b"\n\n")
        resp.close()  # drop the connection mid-stream
    await wait_for(lambda: upstream.stats["client_disconnects"] == 1)
    assert upstream.stats["streams_started"] == 1 and upstream.stats["streams_completed"] == 0


async def test_delay_pacing(mock: tuple[MockUpstream, str]) -> None:
    mock[0].options.first_byte_delay_ms = 150
    arrivals: list[float] = []
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": USER, "stream": True}
        async with session.post(f"{mock[1]}/chat/completions", json=body, headers={"x-mock-delay-ms": "100"}) as resp:
            headers_at = time.monotonic() - start
            async for line in resp.content:
                if line.startswith(b"data: "):
                    arrivals.append(time.monotonic())
    assert headers_at >= 0.13
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:-1])]  # [DONE] follows the last chunk at once
    assert len(gaps) == 5 and min(gaps) >= 0.08


async def test_api_key_and_models(mock: tuple[MockUpstream, str]) -> None:
    upstream, url = mock
    upstream.options.api_key = "sk-right"
    wrong = openai.AsyncOpenAI(base_url=url, api_key="sk-wrong", max_retries=0)
    right = openai.AsyncOpenAI(base_url=url, api_key="sk-right", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.chat.completions.create(model="m", messages=USER)
    with pytest.raises(openai.AuthenticationError):
        await wrong.models.list()
    reply = await right.chat.completions.create(model="m", messages=USER)
    assert reply.choices[0].finish_reason == "stop"
    models = await right.models.list()
    assert [m.id for m in models.data] == ["mock-model"]
    await wrong.close()
    await right.close()


async def test_header_overrides_and_echo_auth(mock: tuple[MockUpstream, str], client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="m", messages=USER, extra_headers={"x-mock-chunks": "2", "x-mock-no-usage": "1", "x-mock-echo-auth": "1"}
    )
    assert reply.usage is None
    assert reply.choices[0].message.content == "[auth: Bearer x] alpha beta "
    _, raw = await post_raw(
        mock[1],
        {"model": "m", "messages": USER, "stream": True, "stream_options": {"include_usage": True}},
        **{"x-mock-no-usage": "1"},
    )
    assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")
    with pytest.raises(openai.InternalServerError) as failure:
        await client.chat.completions.create(
            model="m", messages=USER, extra_headers={"x-mock-fail-status": "500", "x-mock-echo-auth": "1"}
        )
    assert "Bearer x" in failure.value.message
    assert mock[0].options == MockOptions(chunks=4)  # overrides never leak into server defaults


async def test_mock_control_endpoints(mock: tuple[MockUpstream, str], client: openai.AsyncOpenAI) -> None:
    upstream, url = mock
    await client.chat.completions.create(model="m", messages=USER)
    root = url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/_mock/requests") as resp:
            assert [r["body"]["model"] for r in await resp.json()] == ["m"]
        async with session.get(f"{root}/_mock/stats") as resp:
            assert (await resp.json())["requests"] == 1
        async with session.post(f"{root}/_mock/reset") as resp:
            assert resp.status == 200
    assert upstream.requests == [] and upstream.stats["requests"] == 0


def test_cli_arguments_map_to_options() -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    assert options_from_args(parser.parse_args([])) == MockOptions()
    args = parser.parse_args(["--port", "0", "--chunks", "3", "--delay-ms", "5", "--cut-after", "1", "--no-usage", "--api-key", "k"])
    assert args.port == 0
    assert options_from_args(args) == MockOptions(chunks=3, delay_ms=5.0, cut_after=1, report_usage=False, api_key="k")


async def test_run_mock_upstream_process() -> None:
    code = "from proxy.devtools.mock_upstream import MockOptions, run_mock_upstream; run_mock_upstream('127.0.0.1', 0, MockOptions())"
    root = Path(__file__).resolve().parents[3]
    with subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=10)
            assert line.startswith("mock upstream listening on http://127.0.0.1:")
            url = line.split()[-1]
            async with aiohttp.ClientSession() as session, session.get(f"{url}/models") as resp:
                assert (await resp.json())["data"][0]["owned_by"] == "sovereign-mock"
        finally:
            proc.terminate()
