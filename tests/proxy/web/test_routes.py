"""The client contract through the gateway with the official OpenAI SDK."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

MESSAGES = [{"role": "user", "content": "What is the weather?"}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
]


async def test_json_completion(passthrough):
    reply = await passthrough.openai().chat.completions.create(model="sovereign-alpha", messages=MESSAGES)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_streamed_completion(passthrough):
    stream = await passthrough.openai().chat.completions.create(
        model="sovereign-alpha", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text and usage is not None and usage.completion_tokens > 0


async def test_parallel_tool_calls_json(passthrough):
    reply = await passthrough.openai().chat.completions.create(model="sovereign-alpha", messages=MESSAGES, tools=TOOLS)
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "value"}


async def test_tool_calls_streamed_and_assembled_by_the_sdk(passthrough):
    client = passthrough.openai()
    async with client.chat.completions.stream(model="sovereign-alpha", messages=MESSAGES, tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].function.arguments) == {"zone": "value"}


async def test_unknown_model_is_a_typed_404(passthrough):
    with pytest.raises(openai.NotFoundError) as info:
        await passthrough.openai().chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"


async def test_models_list_and_get(passthrough):
    client = passthrough.openai()
    models = await client.models.list()
    assert [m.id for m in models.data] == ["sovereign-alpha"]
    model = await client.models.retrieve("sovereign-alpha")
    assert model.owned_by == "sovereign"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("missing")


@pytest.mark.parametrize(
    "method, path, status, code",
    [
        ("GET", "/v1/unknown", 404, "not_found"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ],
)
async def test_unknown_routes_and_methods_are_openai_shaped(passthrough, method, path, status, code):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, passthrough.base_url + path) as resp:
            body = await resp.json()
            assert resp.status == status
            assert body["error"]["code"] == code
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert resp.headers["X-Request-ID"].startswith("req_")


@pytest.mark.parametrize(
    "data, headers, status, code",
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400, "invalid_value"),
        (b"", {"Content-Type": "application/json"}, 400, "invalid_json"),
        (b"model=x", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "invalid_content_type"),
        (b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}, 400, "invalid_json"),
    ],
)
async def test_bad_bodies_never_reach_the_provider(mock, passthrough, data, headers, status, code):
    async with aiohttp.ClientSession() as session:
        async with session.post(passthrough.v1 + "/chat/completions", data=data, headers=headers) as resp:
            body = await resp.json()
    assert resp.status == status and body["error"]["code"] == code
    assert mock.requests == []


async def test_oversized_body_is_refused_with_413(mock, gateway_factory):
    from tests.support import make_settings

    gw = await gateway_factory(make_settings(mock.url, admin_token=None, server={"max_body_bytes": 2048}))
    big = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "x" * 5000}]}

    async def chunked():
        # No Content-Length: the limit must hold while reading.
        yield json.dumps(big).encode()

    async with aiohttp.ClientSession() as session:
        for data in (json.dumps(big).encode(), chunked()):
            async with session.post(gw.v1 + "/chat/completions", data=data, headers={"Content-Type": "application/json"}) as resp:
                body = await resp.json()
                assert resp.status == 413 and body["error"]["code"] == "request_too_large"
    assert mock.requests == []


async def test_health_and_readiness(passthrough):
    async with aiohttp.ClientSession() as session:
        async with session.get(passthrough.base_url + "/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        async with session.get(passthrough.base_url + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ready"
        passthrough.gateway.draining = True
        async with session.get(passthrough.base_url + "/readyz") as resp:
            assert resp.status == 503 and (await resp.json())["reasons"] == ["draining"]
        async with session.post(passthrough.v1 + "/chat/completions", json={"model": "sovereign-alpha", "messages": MESSAGES}) as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "draining"
