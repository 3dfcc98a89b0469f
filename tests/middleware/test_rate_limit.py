"""The rate-limit unit: rpm and concurrency held across real gateway processes sharing one Redis."""

from __future__ import annotations

import asyncio
import signal
import time

import openai
import pytest

from proxy.store.accounts import Accounts
from tests.support import REDIS_URL, make_settings, settings_data, spawn_gateway

CHAT = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "count to eight"}]}


@pytest.fixture
def accounts(shared_store):
    return Accounts(shared_store)


async def two_gateways(mock, redis_prefix, tmp_path, **units):
    data = settings_data(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "rate_limit"], units=units)
    return await asyncio.gather(spawn_gateway(data, tmp_path, "a"), spawn_gateway(data, tmp_path, "b"))


def stop(*procs) -> None:
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(20)


async def outcome(coro) -> object:
    try:
        return await coro
    except openai.APIStatusError as exc:
        return exc


def assert_rate_limited(exc: object) -> int:
    assert isinstance(exc, openai.RateLimitError), exc
    assert exc.code == "rate_limit_exceeded"
    assert exc.body["type"] == "rate_limit_error"
    retry_after = exc.response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    return int(retry_after)


async def test_rpm_is_one_limit_across_two_processes(mock, redis_prefix, tmp_path, accounts):
    (proc_a, base_a), (proc_b, base_b) = await two_gateways(mock, redis_prefix, tmp_path)
    try:
        await accounts.create_tenant("acme")
        key, _ = await accounts.create_key("acme", rpm=20)
        clients = [openai.AsyncOpenAI(base_url=b + "/v1", api_key=key, max_retries=0) for b in (base_a, base_b)]
        results = await asyncio.gather(
            *(outcome(clients[i % 2].chat.completions.create(**CHAT)) for i in range(100))
        )
        served = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(served) == 20
        assert len(refused) == 80
        retry_afters = {assert_rate_limited(r) for r in refused}
        assert all(1 <= s <= 60 for s in retry_afters)
        assert mock.stats["requests"] == 20
        for client in clients:
            await client.close()
    finally:
        stop(proc_a, proc_b)


async def test_concurrency_never_exceeds_the_limit_across_two_processes(mock, redis_prefix, tmp_path, accounts):
    (proc_a, base_a), (proc_b, base_b) = await two_gateways(mock, redis_prefix, tmp_path)
    try:
        await accounts.create_tenant("acme")
        key, _ = await accounts.create_key("acme", max_concurrency=3)
        clients = [
            openai.AsyncOpenAI(base_url=b + "/v1", api_key=key, max_retries=0, default_headers={"x-mock-delay-ms": "60"})
            for b in (base_a, base_b)
        ]
        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                s = mock.stats
                peak = max(peak, s["streams_started"] - s["streams_completed"] - s["client_disconnects"])
                await asyncio.sleep(0.002)

        async def streamed(client: openai.AsyncOpenAI) -> str:
            stream = await client.chat.completions.create(**CHAT, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        sampler = asyncio.create_task(sample())
        # Stream length: 9 events x 60 ms, far longer than it takes to send 20 requests.
        results = await asyncio.gather(*(outcome(streamed(clients[i % 2])) for i in range(20)))
        sampling = False
        await sampler
        served = [r for r in results if isinstance(r, str)]
        assert len(served) == 3 and all(served)
        for r in results:
            if not isinstance(r, str):
                assert_rate_limited(r)
        assert peak == 3
        # Every slot came back when its stream ended: the next three run again, on both replicas.
        again = await asyncio.gather(*(streamed(clients[i % 2]) for i in range(3)))
        assert all(again)
        for client in clients:
            await client.close()
    finally:
        stop(proc_a, proc_b)


async def test_slots_come_back_after_errors_and_disconnects(mock, gateway_factory, store_url, redis_prefix):
    settings = make_settings(mock.url, store_url=store_url, prefix=redis_prefix, pipeline=["auth", "rate_limit"])
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme")
    key, record = await accounts.create_key("acme", max_concurrency=1)
    client = running.openai(key)
    lease_key = running.gateway.store.tenant_key("acme", "rl", record.id, "inflight")

    async def in_flight() -> int:
        await running.gateway.drain()  # releases run as background tasks
        return await running.gateway.store.redis.zcard(lease_key)

    # JSON: released as soon as the reply is complete.
    for _ in range(3):
        assert (await client.chat.completions.create(**CHAT)).choices
    assert await in_flight() == 0
    # The provider fails: 502, and the slot is free again.
    with pytest.raises(openai.APIStatusError) as failed:
        await client.chat.completions.create(**CHAT, extra_headers={"x-mock-fail-status": "500"})
    assert failed.value.status_code == 502
    assert await in_flight() == 0
    # The provider cuts a stream: released too.
    stream = await client.chat.completions.create(**CHAT, stream=True, extra_headers={"x-mock-cut-after": "2"})
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert await in_flight() == 0
    # The client walks away mid-stream: released.
    stream = await client.chat.completions.create(**CHAT, stream=True, extra_headers={"x-mock-delay-ms": "200"})
    async for _ in stream:
        break
    assert await in_flight() == 1
    # While it is open, a second request is refused.
    assert_rate_limited(await outcome(client.chat.completions.create(**CHAT)))
    await stream.close()
    deadline = time.monotonic() + 5
    while await in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await in_flight() == 0
    assert (await client.chat.completions.create(**CHAT)).choices


async def test_rpm_parity_and_keys_without_limits_touch_no_limit_state(mock, gateway_factory, store_url, redis_prefix):
    settings = make_settings(mock.url, store_url=store_url, prefix=redis_prefix, pipeline=["auth", "rate_limit"])
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme")
    limited, _ = await accounts.create_key("acme", rpm=3)
    free, _ = await accounts.create_key("acme")
    results = [await outcome(running.openai(limited).chat.completions.create(**CHAT)) for _ in range(5)]
    assert [isinstance(r, Exception) for r in results] == [False, False, False, True, True]
    # The window is 60 s: the wait until the first admission leaves it.
    assert 55 <= assert_rate_limited(results[-1]) <= 60
    redis = running.gateway.store.redis
    before = sorted([k async for k in redis.scan_iter(match=f"{redis_prefix}:*", count=1000)])
    for _ in range(10):
        assert (await running.openai(free).chat.completions.create(**CHAT)).choices
    after = sorted([k async for k in redis.scan_iter(match=f"{redis_prefix}:*", count=1000)])
    assert before == after  # unlimited keys write no rate-limit state


async def test_a_killed_gateway_leaks_no_slot_beyond_the_lease(mock, redis_prefix, tmp_path, accounts):
    data = settings_data(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "rate_limit"],
        units={"rate_limit": {"concurrency_lease_seconds": 1.5}},
    )
    (proc_a, base_a), (proc_b, base_b) = await asyncio.gather(
        spawn_gateway(data, tmp_path, "a"), spawn_gateway(data, tmp_path, "b")
    )
    try:
        await accounts.create_tenant("acme")
        key, _ = await accounts.create_key("acme", max_concurrency=1)
        a = openai.AsyncOpenAI(base_url=base_a + "/v1", api_key=key, max_retries=0)
        b = openai.AsyncOpenAI(base_url=base_b + "/v1", api_key=key, max_retries=0)
        stream = await a.chat.completions.create(**CHAT, stream=True, extra_headers={"x-mock-delay-ms": "500"})
        async for _ in stream:
            break
        proc_a.stop()  # SIGKILL: no release
        killed_at = time.monotonic()
        assert_rate_limited(await outcome(b.chat.completions.create(**CHAT)))
        while time.monotonic() - killed_at < 5:
            result = await outcome(b.chat.completions.create(**CHAT))
            if not isinstance(result, Exception):
                break
            assert_rate_limited(result)
            await asyncio.sleep(0.1)
        assert not isinstance(result, Exception)
        assert time.monotonic() - killed_at < 2.5
        await a.close()
        await b.close()
    finally:
        stop(proc_a, proc_b)


async def test_a_lease_recorded_after_a_store_timeout_is_taken_back(mock, gateway_factory, tmp_path):
    """Redis stalls past the store timeout while admitting a request: the 503'd request leaves no slot behind."""
    import asyncio as _asyncio

    from proxy.store.accounts import Accounts
    from tests.support import OwnRedis

    own = OwnRedis(tmp_path)
    await _asyncio.to_thread(own.start)
    try:
        settings = make_settings(mock.url, store_url=own.url, pipeline=["auth", "rate_limit"], admin_token=None,
                                 store={"url": own.url, "prefix": "stall", "timeout": 0.3})
        running = await gateway_factory(settings)
        accounts = Accounts(running.gateway.store)
        await accounts.create_tenant("acme", 0)
        key, record = await accounts.create_key("acme", max_concurrency=1)
        client = running.openai(key)
        await client.models.list()  # warm the key cache: the stall hits the rate-limit script
        await _asyncio.to_thread(own.pause)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(**CHAT)
        await _asyncio.to_thread(own.resume)  # the queued script now runs and records a lease
        await running.gateway.drain()
        lease_key = running.gateway.store.tenant_key("acme", "rl", record.id, "inflight")
        assert await running.gateway.store.redis.zcard(lease_key) == 0
        reply = await client.chat.completions.create(**CHAT)  # the only slot is free
        assert reply.choices
    finally:
        own.kill()


async def test_a_slot_released_while_redis_restarts_is_free_once_it_is_back(mock, gateway_factory, tmp_path):
    """The release used to be one attempt: a stream ending during the outage kept its slot for the whole lease (429 for 11 minutes)."""
    from tests.support import OwnRedis

    own = OwnRedis(tmp_path)
    await asyncio.to_thread(own.start)
    try:
        settings = make_settings(mock.url, store_url=own.url, pipeline=["auth", "rate_limit"], admin_token=None,
                                 store={"url": own.url, "prefix": "restart", "timeout": 0.3})
        running = await gateway_factory(settings)
        accounts = Accounts(running.gateway.store)
        await accounts.create_tenant("acme", 0)
        key, record = await accounts.create_key("acme", max_concurrency=1)
        client = running.openai(key)
        stream = await client.chat.completions.create(**CHAT, stream=True, extra_headers={"x-mock-delay-ms": "200"})
        await asyncio.to_thread(own.kill)  # down while the stream runs: its release at the end fails
        async for _ in stream:
            pass
        await asyncio.to_thread(own.start)
        lease_key = running.gateway.store.tenant_key("acme", "rl", record.id, "inflight")

        async def freed() -> bool:
            try:
                return await running.gateway.store.redis.zcard(lease_key) == 0
            except Exception:
                return False

        deadline = time.monotonic() + 15
        while not await freed():
            assert time.monotonic() < deadline, "the slot was never released"
            await asyncio.sleep(0.1)
        assert (await client.chat.completions.create(**CHAT)).choices  # the only slot is free again
    finally:
        own.kill()


async def test_under_drain_a_stream_the_client_left_keeps_its_slot_until_the_provider_is_done(mock, gateway_factory, redis_prefix):
    """With `on_disconnect: drain` the provider keeps generating: the slot went back at once, so max_concurrency 1 let five run."""
    import aiohttp

    settings = make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "rate_limit", "metering"],
                             admin_token=None, units={"metering": {"on_disconnect": "drain"}})
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("drainer", 10**9)
    key, _ = await accounts.create_key("drainer", max_concurrency=1)
    headers = {"Authorization": f"Bearer {key}", "x-mock-chunks": "20", "x-mock-delay-ms": "100"}  # about 2 s
    async with aiohttp.ClientSession() as http:
        async with http.post(running.v1 + "/chat/completions", json={**CHAT, "stream": True}, headers=headers) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
        left = time.monotonic()  # the client is gone; the provider is not
        await asyncio.sleep(0.3)
        client = running.openai(key)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(**CHAT)
        while True:  # free once the drain has read the provider to its end
            try:
                await client.chat.completions.create(**CHAT)
                break
            except openai.RateLimitError:
                assert time.monotonic() - left < 10
                await asyncio.sleep(0.1)
    assert time.monotonic() - left > 1.0  # not before the provider had finished
