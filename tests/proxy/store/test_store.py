"""Store outages: 503 store_unavailable, /readyz false, and recovery without a restart.

These tests stop Redis, so they run their own redis-server on a free port and
never touch the shared one.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from proxy.store.accounts import Accounts
from middleware.responses.store import RESPONSE_PUT
from tests.support import ADMIN_TOKEN, make_settings

CHAT = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hi"}]}


async def status_of(session: aiohttp.ClientSession, method: str, url: str, **kwargs) -> tuple[int, dict]:
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json()


async def test_outage_gives_503_and_recovers_without_restart(mock, gateway_factory, own_redis):
    settings = make_settings(
        mock.url, store_url=own_redis.url, pipeline=["auth", "rate_limit"], units={"auth": {"cache_seconds": 0}},
        store={"url": own_redis.url, "prefix": "outage", "timeout": 0.5},
    )
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme", 10)
    key, _ = await accounts.create_key("acme", rpm=1000, max_concurrency=10)
    client = running.openai(key)
    assert (await client.chat.completions.create(**CHAT)).choices
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        assert (await status_of(session, "GET", running.base_url + "/readyz"))[0] == 200

        await asyncio.to_thread(own_redis.stop)
        with pytest.raises(openai.InternalServerError) as down:
            await client.chat.completions.create(**CHAT)
        assert down.value.status_code == 503 and down.value.code == "store_unavailable"
        with pytest.raises(openai.InternalServerError) as down:
            await client.models.list()
        assert down.value.code == "store_unavailable"
        status, body = await status_of(session, "GET", running.v1 + "/credits", headers={"Authorization": f"Bearer {key}"})
        assert (status, body["error"]["code"]) == (503, "store_unavailable")
        status, body = await status_of(session, "GET", running.base_url + "/admin/tenants/acme", headers=admin)
        assert (status, body["error"]["code"]) == (503, "store_unavailable")
        status, body = await status_of(session, "GET", running.base_url + "/readyz")
        assert status == 503 and "store_unreachable" in body["reasons"]
        assert mock.stats["requests"] == 1  # nothing was served unmetered or unlimited

        await asyncio.to_thread(own_redis.start)  # same port, scripts forgotten: the gateway reloads them
        deadline = time.monotonic() + 5
        while (await status_of(session, "GET", running.base_url + "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, "readiness did not come back"
            await asyncio.sleep(0.05)
        assert (await client.chat.completions.create(**CHAT)).choices
        status, body = await status_of(session, "GET", running.v1 + "/credits", headers={"Authorization": f"Bearer {key}"})
        assert (status, body["balance"]) == (200, 10)
    assert mock.stats["requests"] == 2


async def test_unlimited_cached_keys_need_no_store_but_limited_keys_fail_closed(mock, gateway_factory, own_redis):
    settings = make_settings(
        mock.url, pipeline=["auth", "rate_limit"], units={"auth": {"cache_seconds": 60}},
        store={"url": own_redis.url, "prefix": "nolimit", "timeout": 0.5},
    )
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme")
    free, _ = await accounts.create_key("acme")
    limited, _ = await accounts.create_key("acme", rpm=100)
    for key in (free, limited):  # warm the auth cache
        assert (await running.openai(key).chat.completions.create(**CHAT)).choices
    await asyncio.to_thread(own_redis.stop)
    # No rate-limit round trip for a key without limits: served from the auth cache alone.
    assert (await running.openai(free).chat.completions.create(**CHAT)).choices
    with pytest.raises(openai.InternalServerError) as down:
        await running.openai(limited).chat.completions.create(**CHAT)
    assert down.value.code == "store_unavailable"


async def test_bulky_script_arguments_stay_off_the_hot_path_connection(shared_store):
    """A multi-megabyte write must not queue in front of every hold on the shared pipelined connection."""
    from proxy.store.store import BULK_BYTES

    store = shared_store
    key = store.tenant_key("t", "response", "resp_big")
    big = "x" * (BULK_BYTES + 1)
    assert await store.run(RESPONSE_PUT, [key], [60, 2, "response", big]) == 1
    assert store.script_client._connection is None  # it went over redis-py's pool
    assert await store.redis.hget(key, "response") == big and 0 < await store.redis.ttl(key) <= 60
    assert await store.run(RESPONSE_PUT, [key], [60, 2, "response", "small"]) == 1
    assert store.script_client._connection is not None  # small ones take the script client
