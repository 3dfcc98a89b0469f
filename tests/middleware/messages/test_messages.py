"""The Anthropic Messages API over chat completions, with the official `anthropic` SDK as the client.

The whole default pipeline runs in front of the simulated provider (or a
scripted one where exact replies matter), on the real Redis; the provider's
recorded requests show the chat mapping.
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp import web

from proxy.core.settings import DEFAULT_PIPELINE
from proxy.store.accounts import Accounts
from tests.support import REDIS_URL, make_settings, provider

MODEL = "sovereign-alpha"
EMBEDDER = "sovereign-embed"
MODELS = {
    MODEL: {"upstream": "default", "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}},
    EMBEDDER: {"upstream": "default", "kind": "embeddings", "price": {"input_per_million": 1_000_000}},
}
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


async def gateway(gateway_factory, upstream_url, redis_prefix, **overrides):
    units = {"messages": {"ping_seconds": 0.05}, **overrides.pop("units", {})}
    settings = make_settings(upstream_url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=DEFAULT_PIPELINE,
                             units=units, models=MODELS, **overrides)
    running = await gateway_factory(settings)
    return running, Accounts(running.gateway.store)


async def tenant_key(accounts: Accounts, credits: int = 10**9, **key) -> tuple[str, str]:
    tenant = "t-" + uuid.uuid4().hex[:10]
    await accounts.create_tenant(tenant, credits)
    plaintext, _ = await accounts.create_key(tenant, **key)
    return tenant, plaintext


@pytest.fixture
async def setup(mock, gateway_factory, redis_prefix):
    running, accounts = await gateway(gateway_factory, mock.url, redis_prefix)
    tenant, key = await tenant_key(accounts)
    client = anthropic.AsyncAnthropic(base_url=running.base_url, api_key=key, max_retries=0)
    yield running, accounts, tenant, key, client
    await client.close()


async def test_create_maps_the_request_onto_chat_and_the_reply_back(setup, mock):
    running, accounts, tenant, key, client = setup
    message = await client.messages.create(
        model=MODEL,
        max_tokens=100,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Be kind."}],
        messages=[
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                                              {"type": "text", "text": "earlier answer"}]},
            {"role": "user", "content": [{"type": "text", "text": "hello world", "cache_control": {"type": "ephemeral"}}]},
        ],
        stop_sequences=["END"],
        metadata={"user_id": "user-42"},
        extra_body={"temperature": 0.5, "top_p": 0.9},  # (no longer parameters of this SDK version)
    )
    sent = mock.requests[-1]["body"]
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},  # the thinking block is not sent back
        {"role": "user", "content": "hello world"},
    ]
    assert sent["max_completion_tokens"] == 100 and sent["stop"] == ["END"]
    assert sent["temperature"] == 0.5 and sent["top_p"] == 0.9 and sent["user"] == "user-42"
    assert sent["model"] == "mock-model" and "max_tokens" not in sent and "system" not in sent
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "hello world " * 4
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens == 8  # the simulated provider: one token per chunk
    assert message.usage.input_tokens == max(1, sum(len(orjson.dumps(m["content"])) // 4 + 4 for m in sent["messages"]))


async def test_max_tokens_and_thinking(setup):
    running, accounts, tenant, key, client = setup
    short = await client.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "a b c d e"}])
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3
    thought = await client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}],
                                           extra_headers={"x-mock-reasoning-chunks": "2"})
    assert [block.type for block in thought.content] == ["thinking", "text"]
    assert thought.content[0].thinking == "think think "


async def test_stream_gives_the_anthropic_event_sequence(setup):
    running, accounts, tenant, key, client = setup
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hello there"}],
                                      extra_headers={"x-mock-reasoning-chunks": "2"}) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    core = [kind for kind in kinds if kind not in ("text", "thinking")]  # the SDK's own convenience events
    assert core == ["message_start",
                    "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                    "content_block_start", *["content_block_delta"] * 8, "content_block_stop",
                    "message_delta", "message_stop"]
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "think think " and final.content[1].text == "hello there " * 4
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 10  # 2 reasoning + 8 content chunks, as the provider reported
    reported = await client.messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hello there"}])
    assert final.usage.input_tokens == reported.usage.input_tokens  # the provider's count, not the estimate


async def stream_deltas(request: web.Request, deltas: list[dict], finish: str, usage: dict | None = None) -> web.StreamResponse:
    """A provider's chat stream: a chunk per delta of choice 0, the finish, the usage chunk when given, [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    head = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}
    chunks = [{**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage is not None:
        chunks.append({**head, "choices": [], "usage": usage})
    for chunk in chunks:
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


def scripted_tools():
    """A provider that calls get_weather first and answers the tool result with text (exact usage)."""
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        answered = any(m["role"] == "tool" for m in body["messages"])
        usage = {"prompt_tokens": 31, "completion_tokens": 7, "total_tokens": 38}
        if not body.get("stream"):
            message = ({"role": "assistant", "content": "It is sunny in Paris."} if answered else
                       {"role": "assistant", "content": None, "tool_calls": [{"id": "call_w1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]})
            return web.json_response({"id": "c1", "object": "chat.completion", "model": "m", "usage": usage,
                                      "choices": [{"index": 0, "message": message,
                                                   "finish_reason": "stop" if answered else "tool_calls"}]})
        deltas = [{"role": "assistant", "content": None}]
        if answered:
            deltas += [{"content": "It is "}, {"content": "sunny."}]
        else:
            deltas += [{"content": "Let me check. "},
                       {"tool_calls": [{"index": 0, "id": "call_w1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": ""}}]},
                       {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                       {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}]
        return await stream_deltas(request, deltas, "stop" if answered else "tool_calls", usage)

    return handler, seen


async def test_tool_round_trip(gateway_factory, redis_prefix):
    handler, seen = scripted_tools()
    async with provider(handler) as url:
        running, accounts = await gateway(gateway_factory, url, redis_prefix)
        tenant, key = await tenant_key(accounts)
        async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key=key, max_retries=0) as client:
            question = {"role": "user", "content": "Weather in Paris?"}
            first = await client.messages.create(model=MODEL, max_tokens=200, messages=[question], tools=[WEATHER],
                                                 tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
            assert seen[-1]["tools"] == [{"type": "function", "function": {
                "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER["input_schema"]}}]
            assert seen[-1]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
            assert seen[-1]["parallel_tool_calls"] is False
            assert first.stop_reason == "tool_use"
            (call,) = first.content
            assert (call.type, call.id, call.name, call.input) == ("tool_use", "call_w1", "get_weather", {"city": "Paris"})
            assert (first.usage.input_tokens, first.usage.output_tokens) == (31, 7)

            turns = [question, {"role": "assistant", "content": first.content},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": [{"type": "text", "text": "sunny, 24 C"}]},
                                                  {"type": "text", "text": "Short answer please."}]}]
            second = await client.messages.create(model=MODEL, max_tokens=200, messages=turns, tools=[WEATHER])
            assert seen[-1]["messages"] == [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 24 C"},
                {"role": "user", "content": "Short answer please."},
            ]
            assert second.stop_reason == "end_turn" and second.content[0].text == "It is sunny in Paris."

            async with client.messages.stream(model=MODEL, max_tokens=200, messages=[question], tools=[WEATHER]) as stream:
                events = [event async for event in stream]
                final = await stream.get_final_message()
            json_deltas = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
            assert json_deltas == ['{"city": ', '"Paris"}']
            starts = [e.content_block.type for e in events if e.type == "content_block_start"]
            assert starts == ["text", "tool_use"]
            assert [b.type for b in final.content] == ["text", "tool_use"]
            assert final.content[1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
            assert (final.usage.input_tokens, final.usage.output_tokens) == (31, 7)

            turns[1] = {"role": "assistant", "content": final.content}
            async with client.messages.stream(model=MODEL, max_tokens=200, messages=turns, tools=[WEATHER]) as stream:
                text = "".join([chunk async for chunk in stream.text_stream])
            assert text == "It is sunny."


async def test_interleaved_parallel_calls_named_late_stream_as_whole_blocks(gateway_factory, redis_prefix):
    """A provider that interleaves two calls' fragments and names the first after its id (vLLM-style parsers)."""
    seen: list[dict] = []

    async def interleaving(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        fragments = [
            {"index": 0, "id": "call_a", "type": "function", "function": {"arguments": ""}},
            {"index": 0, "function": {"name": "get_weather", "arguments": '{"city": '}},
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}},
            {"index": 0, "function": {"arguments": '"Paris"}'}},
            {"index": 1, "function": {"arguments": 'ty": "Rome"}'}},
        ]
        deltas = [{"tool_calls": [fragment]} for fragment in fragments]
        return await stream_deltas(request, deltas, "tool_calls", {"prompt_tokens": 9, "completion_tokens": 4})

    async with provider(interleaving) as url:
        running, accounts = await gateway(gateway_factory, url, redis_prefix)
        tenant, key = await tenant_key(accounts)
        async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key=key, max_retries=0) as client:
            question = {"role": "user", "content": "Weather in Paris and Rome?"}
            async with client.messages.stream(model=MODEL, max_tokens=200, messages=[question], tools=[WEATHER]) as stream:
                events = [event async for event in stream]
                final = await stream.get_final_message()
            # Each block is started, filled and stopped before the next starts.
            blocks = [(e.type, e.index) for e in events if e.type.startswith("content_block_")]
            assert blocks == [("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
                              ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
                              ("content_block_stop", 1)]
            assert [(b.type, b.id, b.name, b.input) for b in final.content] == [
                ("tool_use", "call_a", "get_weather", {"city": "Paris"}),
                ("tool_use", "call_b", "get_weather", {"city": "Rome"}),
            ]
            assert final.stop_reason == "tool_use"

            # The failed call's result tells the model so (chat has no is_error).
            turns = [question, {"role": "assistant", "content": final.content},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": "call_a", "content": "sunny"},
                         {"type": "tool_result", "tool_use_id": "call_b", "content": "city not found", "is_error": True}]}]
            async with client.messages.stream(model=MODEL, max_tokens=200, messages=turns, tools=[WEATHER]) as stream:
                await stream.get_final_message()
            assert seen[-1]["messages"][-2:] == [
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_b", "content": "Error: city not found"},
            ]


async def test_ping_while_the_model_is_silent_then_the_stream(gateway_factory, redis_prefix):
    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)  # headers at once, then a long think
        await asyncio.sleep(0.4)
        head = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
        await response.write(b"data: " + orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async with provider(slow) as url:
        running, accounts = await gateway(gateway_factory, url, redis_prefix)
        tenant, key = await tenant_key(accounts)
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "think hard"}]}
            async with session.post(running.v1 + "/messages", json=body, headers={"x-api-key": key}) as resp:
                assert resp.status == 200 and resp.content_type == "text/event-stream"
                raw = (await resp.read()).decode()
    events = [block.split("\n")[0].removeprefix("event: ") for block in raw.strip().split("\n\n")]
    assert events[0] == "message_start"
    pings = [i for i, name in enumerate(events) if name == "ping"]
    assert len(pings) >= 3 and pings == list(range(1, len(pings) + 1))  # only before the model's first block
    assert events[len(pings) + 1:] == ["content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert 'data: {"type":"ping"}' in raw


async def test_provider_failure_mid_stream_is_an_error_event(setup, mock):
    running, accounts, tenant, key, client = setup
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hello"}],
                                          extra_headers={"x-mock-cut-after": "2"}) as stream:
            async for _ in stream:
                pass
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "api_error"
    assert "broke off" in caught.value.body["error"]["message"]


async def test_claude_code_headers_and_fields_are_accepted(setup, mock):
    running, accounts, tenant, key, client = setup
    headers = {
        "x-api-key": key,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
        "anthropic-dangerous-direct-browser-access": "true",
        "x-app": "cli",
        "user-agent": "claude-cli/2.0.0 (external, cli)",
    }
    body = {
        "model": MODEL,
        "max_tokens": 32000,
        "stream": True,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
            {"type": "text", "text": "list files", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{**WEATHER, "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "user_abc_account__session_123"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "temperature": 1,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(running.v1 + "/messages?beta=true", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            raw = await resp.read()
        assert b"event: message_stop" in raw
        assert not {"x-api-key", "anthropic-version", "anthropic-beta"} & set(mock.requests[-1]["headers"])
        sent = mock.requests[-1]["body"]
        assert sent["messages"][1]["content"] == [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                                                  {"type": "text", "text": "list files"}]
        async with session.post(running.v1 + "/messages/count_tokens?beta=true", json={k: body[k] for k in ("model", "system", "messages", "tools")},
                                headers=headers) as resp:
            assert resp.status == 200 and (await resp.json())["input_tokens"] > 0


async def test_count_tokens_is_the_gateways_estimate_and_free(setup, mock):
    running, accounts, tenant, key, client = setup
    before = await accounts.tenant(tenant)
    requests_before = len(mock.requests)
    messages = [{"role": "user", "content": "hello world " * 50}]
    counted = await client.messages.count_tokens(model=MODEL, messages=messages, system="Be brief.")
    chat = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world " * 50}]}
    assert counted.input_tokens == -(-len(orjson.dumps(chat)) // 3) + 8 * 2  # metering's estimate (3 bytes per token)
    assert len(mock.requests) == requests_before  # the provider is not asked
    await running.gateway.drain()
    assert await accounts.tenant(tenant) == before  # nothing held, nothing charged
    async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key="sk-sov-live-" + "x" * 40, max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            await stranger.messages.count_tokens(model=MODEL, messages=messages)


async def test_sessions_work_on_the_messages_route(setup, mock):
    running, accounts, tenant, key, client = setup
    headers = {"X-Session-ID": "sess-messages-1"}
    first = await client.messages.with_raw_response.create(model=MODEL, max_tokens=20, extra_headers=headers,
                                                           messages=[{"role": "user", "content": "my name is Ada"}])
    assert first.headers["x-session-id"] == "sess-messages-1"
    answer = (await first.parse()).content[0].text
    await client.messages.create(model=MODEL, max_tokens=20, extra_headers=headers, messages=[{"role": "user", "content": "who am I?"}])
    assert mock.requests[-1]["body"]["messages"][:3] == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "who am I?"},
    ]


# -- errors: the Anthropic shape, and the SDK's matching exception classes --------------------


async def _error_of(coro) -> anthropic.APIStatusError:
    try:
        await coro
    except anthropic.APIStatusError as error:
        assert error.body["type"] == "error" and set(error.body["error"]) == {"type", "message"}
        return error
    raise AssertionError("no error")


async def test_each_error_type_maps_to_the_sdk_exception(mock, gateway_factory, redis_prefix):
    running, accounts = await gateway(gateway_factory, mock.url, redis_prefix, server={"max_body_bytes": 4096})
    tenant, key = await tenant_key(accounts)
    client = anthropic.AsyncAnthropic(base_url=running.base_url, api_key=key, max_retries=0)
    hello = [{"role": "user", "content": "hello"}]

    bad = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "x"}]}]))
    assert isinstance(bad, anthropic.BadRequestError) and bad.body["error"]["type"] == "invalid_request_error"
    assert "messages[1].content[0].input" in bad.body["error"]["message"]
    unknown_block = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=[
        {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "video"}]}]))
    assert "messages[1].content[1].type" in unknown_block.body["error"]["message"]
    missing = await _error_of(client.messages.create(model=MODEL, messages=hello, extra_body={"max_tokens": None}, max_tokens=1))
    assert "max_tokens" in missing.body["error"]["message"]
    image = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]))
    assert isinstance(image, anthropic.BadRequestError)
    assert image.body["error"]["message"].startswith("messages[0].content[0]: ")
    assert "unsupported_image_input" in image.body["error"]["message"]  # the same code as on the OpenAI routes
    server_tool = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=hello,
                                                         tools=[{"type": "web_search_20250305", "name": "web_search"}]))
    assert isinstance(server_tool, anthropic.BadRequestError) and "tools[0].type" in server_tool.body["error"]["message"]
    embedder = await _error_of(client.messages.create(model=EMBEDDER, max_tokens=10, messages=hello))
    assert isinstance(embedder, anthropic.BadRequestError) and EMBEDDER in embedder.body["error"]["message"]
    relayed = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=hello,
                                                     extra_headers={"x-mock-fail-status": "422"}))
    assert relayed.status_code == 422 and relayed.body["error"]["message"] == "mock failure"

    async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key="sk-sov-live-" + "y" * 40, max_retries=0) as wrong:
        denied = await _error_of(wrong.messages.create(model=MODEL, max_tokens=10, messages=hello))
    assert isinstance(denied, anthropic.AuthenticationError) and denied.body["error"]["type"] == "authentication_error"

    poor_tenant, poor_key = await tenant_key(accounts, credits=1)
    async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key=poor_key, max_retries=0) as poor:
        broke = await _error_of(poor.messages.create(model=MODEL, max_tokens=10, messages=hello))
    assert broke.status_code == 402 and broke.body["error"]["type"] == "billing_error"
    assert isinstance(broke, anthropic.PaymentRequiredError)

    missing_model = await _error_of(client.messages.create(model="no-such-model", max_tokens=10, messages=hello))
    assert isinstance(missing_model, anthropic.NotFoundError) and missing_model.body["error"]["type"] == "not_found_error"

    large = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x" * 5000}]))
    assert large.status_code == 413 and large.body["error"]["type"] == "request_too_large"

    limited_tenant, limited_key = await tenant_key(accounts, rpm=1)
    async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key=limited_key, max_retries=0) as limited:
        await limited.messages.create(model=MODEL, max_tokens=10, messages=hello)
        throttled = await _error_of(limited.messages.create(model=MODEL, max_tokens=10, messages=hello))
    assert isinstance(throttled, anthropic.RateLimitError) and throttled.body["error"]["type"] == "rate_limit_error"
    assert int(throttled.response.headers["retry-after"]) >= 1

    provider_down = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=hello,
                                                           extra_headers={"x-mock-fail-status": "500"}))
    assert isinstance(provider_down, anthropic.InternalServerError) and provider_down.status_code == 502
    assert provider_down.body["error"]["type"] == "api_error"

    saturated = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=hello,
                                                       extra_headers={"x-mock-fail-status": "429"}))
    # The provider limiting the gateway is not this key's rate limit: Anthropic's "overloaded".
    assert isinstance(saturated, anthropic.OverloadedError) and saturated.body["error"]["type"] == "overloaded_error"

    running.gateway.draining = True
    try:
        overloaded = await _error_of(client.messages.create(model=MODEL, max_tokens=10, messages=hello))
    finally:
        running.gateway.draining = False
    assert isinstance(overloaded, anthropic.OverloadedError) and overloaded.body["error"]["type"] == "overloaded_error"

    unknown_route = await _error_of(client.post("/v1/messages/nope", body={}, cast_to=object))
    assert isinstance(unknown_route, anthropic.NotFoundError)
    await client.close()


async def test_store_down_is_a_503_api_error(mock, gateway_factory, own_redis, redis_prefix):
    running, accounts = await gateway(gateway_factory, mock.url, redis_prefix, store={"url": own_redis.url, "timeout": 0.3},
                                      units={"auth": {"cache_seconds": 0}})
    tenant, key = await tenant_key(accounts)
    async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key=key, max_retries=0) as client:
        own_redis.kill()  # the key lookup itself meets the dead store
        down = await _error_of(client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]))
    assert isinstance(down, anthropic.ServiceUnavailableError) and down.status_code == 503
    assert down.body["error"]["type"] == "api_error" and "store" in down.body["error"]["message"]


async def test_openai_routes_keep_the_openai_error_shape(setup):
    running, accounts, tenant, key, client = setup
    async with aiohttp.ClientSession() as session:
        async with session.post(running.v1 + "/chat/completions", json={"model": EMBEDDER, "messages": [{"role": "user", "content": "x"}]},
                                headers={"Authorization": f"Bearer {key}"}) as resp:
            body = await resp.json()
        assert resp.status == 400 and body["error"]["param"] == "model" and EMBEDDER in body["error"]["message"]
        # x-api-key is an Anthropic convention: the OpenAI routes do not take it.
        async with session.post(running.v1 + "/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                                headers={"x-api-key": key}) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
            assert "x-api-key" not in (await resp.json())["error"]["message"]
        # ... while the Messages routes say they take it.
        async with session.post(running.v1 + "/messages", json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}) as resp:
            body = await resp.json()
        assert resp.status == 401 and "x-api-key" in body["error"]["message"]



async def test_without_the_unit_the_route_is_not_served(passthrough, mock):
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(passthrough.v1 + "/messages", json=body) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    assert mock.requests == []  # an Anthropic body never reaches a chat provider untranslated


async def test_tool_names_over_64_characters_reach_the_provider_shortened_and_come_back_whole(setup, mock):
    """Claude Code's MCP tools (`mcp__<server>__<tool>`) pass the 64 characters chat providers take."""
    running, accounts, tenant, key, client = setup
    long_name = "mcp__github-enterprise__" + "list_pull_request_review_comments_for_repository" * 2
    other = "mcp__github-enterprise__" + "list_pull_request_review_comments_for_repository_" + "x" * 40
    assert len(long_name) > 64 and len(other) > 64 and long_name[:55] == other[:55]
    tools = [{**WEATHER, "name": long_name}, {**WEATHER, "name": other}]
    question = {"role": "user", "content": "Comments?"}
    first = await client.messages.create(model=MODEL, max_tokens=200, messages=[question], tools=tools,
                                         tool_choice={"type": "tool", "name": long_name})
    sent = mock.requests[-1]["body"]
    provider_names = [tool["function"]["name"] for tool in sent["tools"]]
    assert all(len(name) <= 64 for name in provider_names) and len(set(provider_names)) == 2  # distinct, though alike
    assert sent["tool_choice"] == {"type": "function", "function": {"name": provider_names[0]}}
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert call.name == long_name  # the client's own name, not the provider's

    async with client.messages.stream(model=MODEL, max_tokens=200, messages=[question], tools=tools) as stream:
        final = await stream.get_final_message()
    assert [block.name for block in final.content if block.type == "tool_use"] == [long_name, other]

    # The next turn carries the call in its history: the provider sees the same short name again.
    turns = [question, {"role": "assistant", "content": first.content},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "3 comments"}]}]
    await client.messages.create(model=MODEL, max_tokens=200, messages=turns, tools=tools)
    history = mock.requests[-1]["body"]["messages"]
    assert history[1]["tool_calls"][0]["function"]["name"] == provider_names[0]


async def test_the_sdk_sees_the_request_id_of_replies_streams_and_errors(setup):
    """Anthropic's SDKs read `request-id`; every answer on these routes carries it (and `x-request-id`)."""
    running, accounts, tenant, key, client = setup
    question = [{"role": "user", "content": "hi"}]
    raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=20, messages=question)
    message = await raw.parse()
    assert message._request_id == raw.headers["x-request-id"] and message._request_id.startswith("req_")
    async with client.messages.stream(model=MODEL, max_tokens=20, messages=question) as stream:
        await stream.get_final_message()
        assert stream.request_id and stream.request_id.startswith("req_")
    with pytest.raises(anthropic.NotFoundError) as missing:  # the gateway's own error
        await client.messages.create(model="no-such-model", max_tokens=20, messages=question)
    assert missing.value.request_id == missing.value.body["request_id"]
    with pytest.raises(anthropic.UnprocessableEntityError) as relayed:  # the provider's, relayed
        await client.messages.create(model=MODEL, max_tokens=20, messages=question, extra_headers={"x-mock-fail-status": "422"})
    assert relayed.value.request_id and relayed.value.body["request_id"] == relayed.value.request_id
    # Other routes keep only X-Request-ID.
    async with aiohttp.ClientSession() as http:
        async with http.get(running.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.headers["X-Request-ID"] and "request-id" not in resp.headers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_provider_refusal_is_text_with_stop_reason_refusal(setup, stream):
    """Anthropic has no refusal block: the provider's `refusal` text is a text block, and `stop_reason` says why."""
    *_, client = setup
    kwargs = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "where?"}],
              "extra_headers": {"x-mock-refuse": "I cannot help with that."}}
    if stream:
        async with client.messages.stream(**kwargs) as events:
            message = await events.get_final_message()
    else:
        message = await client.messages.create(**kwargs)
    assert [(block.type, block.text) for block in message.content] == [("text", "I cannot help with that. ")]
    assert message.stop_reason == "refusal"


async def test_a_200_error_body_from_the_provider_is_an_anthropic_502(gateway_factory, redis_prefix):
    async def failing(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": {"message": "Provider returned error", "code": 502}})

    async with provider(failing) as url:
        running, accounts = await gateway(gateway_factory, url, redis_prefix)
        _, key = await tenant_key(accounts)
        async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key=key, max_retries=0) as client:
            with pytest.raises(anthropic.InternalServerError) as info:
                await client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    assert info.value.body["type"] == "error" and "Provider returned error" in info.value.body["error"]["message"]


def _scenario_provider():
    """A provider whose reply the last user message picks: `same-index` (Ollama numbers parallel calls all 0),
    `tool-stop-no-call` (finish_reason tool_calls, no call), `no-usage` (text, no usage reported)."""
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        scenario = body["messages"][-1]["content"]
        if scenario == "same-index":
            deltas = [{"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                       "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                      {"tool_calls": [{"index": 0, "id": "call_b", "type": "function",
                                       "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}]
            finish = "tool_calls"
        elif scenario == "tool-stop-no-call":
            deltas, finish = [{"content": "Nothing to call."}], "tool_calls"
        else:
            deltas, finish = [{"content": "twelve chars"}], "stop"
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(d.get("content", "") for d in deltas) or None}
            return web.json_response({"id": "c", "object": "chat.completion", "model": "m",
                                      "choices": [{"index": 0, "message": message, "finish_reason": finish}]})
        return await stream_deltas(request, deltas, finish)

    return handler, seen


async def test_provider_quirks_give_well_formed_messages(gateway_factory, redis_prefix):
    handler, seen = _scenario_provider()
    async with provider(handler) as url:
        running, accounts = await gateway(gateway_factory, url, redis_prefix)
        tenant, key = await tenant_key(accounts)
        async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key=key, max_retries=0) as client:
            def ask(text):
                return {"model": MODEL, "max_tokens": 100, "tools": [WEATHER], "messages": [{"role": "user", "content": text}]}

            # Two calls at one index (distinct ids) are two tool_use blocks; the second used to be merged into the first.
            async with client.messages.stream(**ask("same-index")) as stream:
                final = await stream.get_final_message()
            assert [(b.id, b.input) for b in final.content] == [("call_a", {"city": "Paris"}), ("call_b", {"city": "Rome"})]

            # finish_reason tool_calls without a call: end_turn (tool_use promises a tool_use block).
            message = await client.messages.create(**ask("tool-stop-no-call"))
            async with client.messages.stream(**ask("tool-stop-no-call")) as stream:
                streamed = await stream.get_final_message()
            assert message.stop_reason == streamed.stop_reason == "end_turn"

            # No usage reported: the usage shown is what was billed (the estimate), not zeros.
            for stream_it in (False, True):
                before = (await accounts.tenant(tenant))["balance"]
                if stream_it:
                    async with client.messages.stream(**ask("no-usage")) as stream:
                        shown = (await stream.get_final_message()).usage
                else:
                    shown = (await client.messages.create(**ask("no-usage"))).usage
                await running.gateway.drain()
                (charge, *_) = [e for e in await accounts.ledger(tenant) if e["type"] == "charge"]
                assert charge["usage_source"] == "estimated" and charge["output_tokens"] == 3  # ceil(12 characters / 4)
                assert (shown.input_tokens, shown.output_tokens) == (charge["input_tokens"], charge["output_tokens"])
                assert before - (await accounts.tenant(tenant))["balance"] == shown.input_tokens + 2 * shown.output_tokens


async def test_structured_outputs_strict_tools_and_a_null_tool_type_reach_the_provider(setup, mock):
    running, accounts, tenant, key, client = setup
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"], "additionalProperties": False}
    await client.messages.create(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}],
        tools=[{**WEATHER, "type": None, "strict": True}],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}},
    )
    body = mock.requests[-1]["body"]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert body["tools"][0]["function"]["strict"] is True
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}],
                                     extra_body={"output_config": {"format": {"type": "xml"}}})
    assert "output_config.format" in info.value.message


async def test_a_providers_400_names_no_path_of_the_translated_body(gateway_factory, redis_prefix):
    """The provider's `param` is a path in the chat body (its indices are not the client's): it used to lead the message."""
    async def refuses(request: web.Request) -> web.Response:
        await request.read()
        error = {"message": "Invalid content.", "type": "invalid_request_error", "param": "messages[2].content", "code": None}
        return web.json_response({"error": error}, status=400)

    async with provider(refuses) as url:
        running, accounts = await gateway(gateway_factory, url, redis_prefix)
        tenant, key = await tenant_key(accounts)
        async with anthropic.AsyncAnthropic(base_url=running.base_url, api_key=key, max_retries=0) as client:
            with pytest.raises(anthropic.BadRequestError) as info:
                await client.messages.create(model=MODEL, max_tokens=10, system="be brief",
                                             messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"] == {"type": "invalid_request_error", "message": "Invalid content."}
