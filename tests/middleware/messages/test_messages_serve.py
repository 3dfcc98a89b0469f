"""The main flows against a real `sovereign serve` process: the `anthropic` SDK on /v1/messages and the
`openai` SDK on /v1/embeddings, with credits on the real Redis checked through the admin API.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import anthropic
import openai
import pytest

from proxy.core.settings import DEFAULT_PIPELINE
from tests.middleware.messages.test_messages import WEATHER, scripted_tools
from tests.support import ADMIN_TOKEN, REDIS_URL, provider, settings_data, spawn_gateway

CREDITS = 1_000_000
MODELS = {
    # One credit per input token, two per output token.
    "sovereign-alpha": {"upstream": "default", "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}},
    "sovereign-tools": {"upstream": "scripted", "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}},
    "sovereign-embed": {"upstream": "default", "kind": "embeddings", "price": {"input_per_million": 1_000_000}},
}


@pytest.fixture
async def served(mock, redis_prefix, tmp_path):
    handler, seen = scripted_tools()
    async with provider(handler) as scripted_url:
        data = settings_data(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=DEFAULT_PIPELINE, models=MODELS)
        data["upstreams"]["scripted"] = {"url": scripted_url}
        proc, base = await spawn_gateway(data, tmp_path)
        admin = aiohttp.ClientSession(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            async with admin.post("/admin/tenants", json={"id": "anthropic-co", "credits": CREDITS}) as resp:
                assert resp.status == 201
            async with admin.post("/admin/keys", json={"tenant": "anthropic-co"}) as resp:
                key = (await resp.json())["key"]
            yield base, key, admin, seen
        finally:
            await admin.close()
            proc.signal(15)
            proc.wait(15)


async def settled_balance(admin: aiohttp.ClientSession, expected_change: int, before: int) -> int:
    """The tenant's balance once nothing is reserved (settlements run just after the reply)."""
    deadline = time.monotonic() + 5
    while True:
        async with admin.get("/admin/tenants/anthropic-co") as resp:
            tenant = await resp.json()
        if (tenant["reserved"] == 0 and tenant["balance"] == before - expected_change) or time.monotonic() > deadline:
            return tenant["balance"]
        await asyncio.sleep(0.02)


async def test_messages_create_and_stream_are_charged_from_the_providers_usage(served):
    base, key, admin, _ = served
    async with anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0) as client:
        message = await client.messages.create(model="sovereign-alpha", max_tokens=64,
                                               messages=[{"role": "user", "content": "hello sovereign"}])
        assert message.content[0].text == "hello sovereign " * 4
        assert message.usage.output_tokens == 8 and message.usage.input_tokens > 0
        cost = message.usage.input_tokens + 2 * message.usage.output_tokens
        balance = await settled_balance(admin, cost, CREDITS)
        assert balance == CREDITS - cost

        async with client.messages.stream(model="sovereign-alpha", max_tokens=5,
                                          messages=[{"role": "user", "content": "stream this please"}]) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "stream this please stream this "
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
        streamed_cost = final.usage.input_tokens + 2 * final.usage.output_tokens
        assert await settled_balance(admin, streamed_cost, balance) == balance - streamed_cost


async def test_tool_round_trip_through_the_served_gateway(served):
    base, key, admin, seen = served
    async with anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0) as client:
        question = {"role": "user", "content": "Weather in Paris?"}
        async with client.messages.stream(model="sovereign-tools", max_tokens=100, messages=[question], tools=[WEATHER]) as stream:
            deltas = [e.delta.partial_json async for e in stream
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
            asked = await stream.get_final_message()
        assert deltas == ['{"city": ', '"Paris"}']
        call = asked.content[-1]
        assert call.type == "tool_use" and call.input == {"city": "Paris"} and asked.stop_reason == "tool_use"
        answer = await client.messages.create(model="sovereign-tools", max_tokens=100, tools=[WEATHER], messages=[
            question, {"role": "assistant", "content": asked.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}])
        assert answer.content[0].text == "It is sunny in Paris." and answer.stop_reason == "end_turn"
        assert seen[-1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_w1", "content": "sunny"}


async def test_embeddings_through_the_served_gateway(served, mock):
    base, key, admin, _ = served
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client:
        floats = await client.embeddings.create(model="sovereign-embed", input=["one text", "another text"], encoding_format="float")
        assert len(floats.data) == 2 and len(floats.data[0].embedding) == 8
        decoded = await client.embeddings.create(model="sovereign-embed", input="one text")  # base64 on the wire
        assert mock.requests[-1]["body"]["encoding_format"] == "base64"
        assert decoded.data[0].embedding == floats.data[0].embedding
        charged = floats.usage.prompt_tokens + decoded.usage.prompt_tokens
        assert await settled_balance(admin, charged, CREDITS) == CREDITS - charged
        with pytest.raises(openai.BadRequestError) as refused:
            await client.embeddings.create(model="sovereign-alpha", input="hi")
        assert "sovereign-alpha" in refused.value.body["message"]
