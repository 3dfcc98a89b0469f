"""The rate-limit and credit headers OpenAI clients read, on every /v1 reply of a key with limits (real Redis)."""

from __future__ import annotations

import re
import uuid

import openai
import pytest
from aiohttp import web

from middleware.rate_limit.unit import duration
from proxy.store.accounts import Accounts
from tests.support import REDIS_URL, make_settings, provider

CHAT = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


def reset_ms(value: str) -> float:
    """Parse the reset header back (OpenAI's Go-style duration: 20ms, 1.5s, 6m0s)."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)", value):
        total += float(number) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[unit]
    return total


async def limited_gateway(gateway_factory, upstream_url, redis_prefix, rpm=3, credits=10_000_000):
    settings = make_settings(
        upstream_url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "rate_limit", "metering"], admin_token=None
    )
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    tenant = "t-" + uuid.uuid4().hex[:10]
    await accounts.create_tenant(tenant, credits)
    key, record = await accounts.create_key(tenant, rpm=rpm)
    return running, accounts, tenant, key, record


async def test_headers_count_down_and_the_429_carries_them(mock, gateway_factory, redis_prefix):
    running, _, tenant, key, _ = await limited_gateway(gateway_factory, mock.url, redis_prefix, rpm=3)
    client = running.openai(key)
    seen = []
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
        seen.append(raw.headers)
    assert [h["x-ratelimit-limit-requests"] for h in seen] == ["3", "3", "3"]
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    resets = [reset_ms(h["x-ratelimit-reset-requests"]) for h in seen]
    # The oldest admission (the first) leaves the window first: the reset only comes nearer.
    assert 55_000 < resets[0] <= 60_000 and resets[2] <= resets[1] <= resets[0]
    credits = [int(h["x-sovereign-credits-remaining"]) for h in seen]
    assert all(c < 10_000_000 for c in credits) and credits == sorted(credits, reverse=True)

    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(**CHAT)
    headers = refused.value.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-limit-requests"] == "3"
    assert reset_ms(headers["x-ratelimit-reset-requests"]) <= resets[2]
    assert int(headers["retry-after"]) == max(1, -(-int(reset_ms(headers["x-ratelimit-reset-requests"])) // 1000))
    assert len(mock.requests) == 3


async def test_the_window_resets(mock, gateway_factory, redis_prefix):
    running, _, tenant, key, record = await limited_gateway(gateway_factory, mock.url, redis_prefix, rpm=2)
    client = running.openai(key)
    for _ in range(2):
        await client.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(**CHAT)
    # Sixty seconds pass for the window: the recorded admissions are moved 61 s into the past,
    # on the Redis server whose clock the script reads (a test must not sleep for a minute).
    store = running.gateway.store
    log_key = store.tenant_key(tenant, "rl", record.id, "rpm")
    admitted = await store.redis.zrange(log_key, 0, -1, withscores=True)
    assert len(admitted) == 2
    await store.redis.zadd(log_key, {member: score - 61_000 for member, score in admitted})
    raw = await client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert reset_ms(raw.headers["x-ratelimit-reset-requests"]) > 55_000  # only this request is counted now


async def test_streams_carry_them_and_keys_without_limits_get_none(mock, gateway_factory, redis_prefix):
    running, accounts, tenant, key, _ = await limited_gateway(gateway_factory, mock.url, redis_prefix, rpm=10)
    client = running.openai(key)
    async with client.chat.completions.with_streaming_response.create(**CHAT, stream=True) as response:
        assert response.headers["x-ratelimit-remaining-requests"] == "9"
        assert int(response.headers["x-sovereign-credits-remaining"]) > 0
        async for _ in response.iter_lines():
            pass
    unlimited, _ = await accounts.create_key(tenant)
    raw = await running.openai(unlimited).chat.completions.with_raw_response.create(**CHAT)
    assert not any(name.lower().startswith("x-ratelimit-") for name in raw.headers)
    assert int(raw.headers["x-sovereign-credits-remaining"]) > 0  # credits are the tenant's, limits the key's


async def test_the_providers_own_rate_limit_headers_never_reach_the_client(gateway_factory, redis_prefix):
    async def chat(request: web.Request) -> web.Response:
        body = {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        headers = {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
                   "x-ratelimit-reset-requests": "6ms", "x-ratelimit-remaining-tokens": "1999000"}
        return web.json_response(body, headers=headers)

    async with provider(chat) as url:
        running, accounts, tenant, key, _ = await limited_gateway(gateway_factory, url, redis_prefix, rpm=5)
        raw = await running.openai(key).chat.completions.with_raw_response.create(**CHAT)
        assert raw.headers["x-ratelimit-limit-requests"] == "5"  # the key's, not the operator's account
        assert raw.headers["x-ratelimit-remaining-requests"] == "4"
        assert "x-ratelimit-remaining-tokens" not in raw.headers
        unlimited, _ = await accounts.create_key(tenant)
        raw = await running.openai(unlimited).chat.completions.with_raw_response.create(**CHAT)
        assert not any(name.lower().startswith("x-ratelimit-") for name in raw.headers)


def test_reset_durations_are_written_as_openai_writes_them():
    assert [duration(ms) for ms in (0, 20, 999, 1000, 1500, 8640, 59_999, 60_000, 61_250, 360_000, 3_723_000)] == [
        "0ms", "20ms", "999ms", "1s", "1.5s", "8.64s", "59.999s", "1m0s", "1m1.25s", "6m0s", "1h2m3s"
    ]
