"""Metering under failure: provider errors, cut streams, client disconnects, killed gateways, Redis restarts."""

from __future__ import annotations

import asyncio
import math
import shutil
import signal
import time

import aiohttp
import openai
import orjson
import pytest

from proxy.store.accounts import Accounts
from tests.middleware.metering.test_metering import MESSAGES, PIPELINE, assert_ledger_matches, metered, new_tenant, prompt_tokens
from tests.support import REDIS_URL, OwnRedis, make_settings, settings_data


def raw_request(max_tokens: int, stream: bool = True) -> bytes:
    return orjson.dumps({"model": "sovereign-alpha", "messages": MESSAGES, "max_tokens": max_tokens, "stream": stream})


def prompt_estimate(raw: bytes) -> int:
    return math.ceil(len(raw) / 3) + 8 * len(MESSAGES)


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_provider_failure_before_output_charges_nothing(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 1000)
    client = running.openai(key, default_headers={"x-mock-fail-status": "500"})
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=5, stream=stream)
        assert exc.value.status_code == 502
    # A stream cut before its first content chunk produced nothing either.
    cut = running.openai(key, default_headers={"x-mock-cut-after": "0"})
    stream = await cut.chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=5, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await running.gateway.drain()
    view = await accounts.tenant(tenant)
    assert (view["balance"], view["reserved"]) == (1000, 0)
    assert [e["type"] for e in await accounts.ledger(tenant)] == ["grant"]
    assert running.gateway.metrics.holds_open._value.get() == 0


async def test_provider_cut_mid_stream_charges_what_was_produced(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 1000)
    raw = raw_request(20)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "x-mock-cut-after": "3"}
    content, errors = [], []
    async with aiohttp.ClientSession() as http:
        async with http.post(running.v1 + "/chat/completions", data=raw, headers=headers) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    obj = orjson.loads(line[6:])
                    if "error" in obj:
                        errors.append(obj["error"])
                    elif obj["choices"][0]["delta"].get("content"):
                        content.append(obj["choices"][0]["delta"]["content"])
    assert len(content) == 3 and errors and errors[0]["code"] == "upstream_error"
    await running.gateway.drain()
    entry = (await accounts.ledger(tenant))[0]
    out = max(3, math.ceil(sum(map(len, content)) / 4))
    assert entry["usage_source"] == "estimated" and entry["output_tokens"] == out
    assert entry["input_tokens"] == prompt_estimate(raw)
    assert entry["credits"] == -(prompt_estimate(raw) + 2 * out)
    view = await assert_ledger_matches(accounts, tenant)
    assert view["reserved"] == 0


async def _disconnect_after(url: str, key: str, raw: bytes, chunks: int) -> list[str]:
    """Read `chunks` content chunks of a slow stream, then drop the connection."""
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "x-mock-chunks": "40",
        "x-mock-delay-ms": "40",
    }
    content: list[str] = []
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url + "/chat/completions", data=raw, headers=headers)
        async for line in resp.content:
            if line.startswith(b"data: {"):
                delta = orjson.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    content.append(delta["content"])
                    if len(content) == chunks:
                        break
        resp.close()  # drops the connection mid-stream
    return content


async def test_client_disconnect_cancel_stops_the_provider_and_charges_an_estimate(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix)
    tenant, key = await new_tenant(accounts, 1000)
    raw = raw_request(100)
    content = await _disconnect_after(running.v1, key, raw, 3)
    await wait_for(lambda: mock.stats["client_disconnects"] >= 1)
    await running.gateway.drain()
    assert mock.stats["streams_completed"] == 0
    entry = (await accounts.ledger(tenant))[0]
    assert entry["type"] == "charge" and entry["usage_source"] == "estimated"
    # Delivered: what the client read, plus the few chunks in flight when it left —
    # far from the 40 the provider would have produced.
    low = max(3, math.ceil(sum(map(len, content)) / 4))
    assert low <= entry["output_tokens"] < 30
    assert entry["input_tokens"] == prompt_estimate(raw)
    view = await assert_ledger_matches(accounts, tenant)
    assert view["reserved"] == 0


async def test_client_disconnect_drain_reads_to_the_end_and_charges_reported_usage(mock, gateway_factory, redis_prefix):
    running, accounts = await metered(gateway_factory, mock, redis_prefix, {"on_disconnect": "drain"})
    tenant, key = await new_tenant(accounts, 1000)
    await _disconnect_after(running.v1, key, raw_request(100), 3)
    await wait_for(lambda: mock.stats["streams_completed"] == 1)
    await running.gateway.drain()
    assert mock.stats["client_disconnects"] == 0
    entry = (await accounts.ledger(tenant))[0]
    assert entry["usage_source"] == "reported" and entry["output_tokens"] == 40
    assert entry["input_tokens"] == prompt_tokens(MESSAGES)  # the provider's count, not the estimate
    view = await assert_ledger_matches(accounts, tenant)
    assert view["reserved"] == 0


async def test_killed_gateway_leaves_no_hold_after_expiry(mock, redis_prefix, shared_store, replicas):
    data = settings_data(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=PIPELINE, admin_token=None,
        units={"metering": {"hold_ttl_seconds": 2}},
    )
    [(proc, base)] = await replicas(data)
    store = shared_store
    accounts = Accounts(store)
    tenant, key = await new_tenant(accounts, 1000)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
               "x-mock-chunks": "50", "x-mock-delay-ms": "100"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(base + "/v1/chat/completions", data=raw_request(100), headers=headers)
        await resp.content.readline()  # the stream is open: the hold exists
        held = await accounts.tenant(tenant)
        assert held["reserved"] > 0
        proc.proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        resp.close()
    await asyncio.sleep(2.2)
    view = await accounts.tenant(tenant)  # sweeps the expired hold
    assert (view["balance"], view["reserved"]) == (1000, 0)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
async def test_redis_restart_under_load_serves_nothing_unmetered(mock, gateway_factory, tmp_path):
    redis = OwnRedis(tmp_path)
    redis.start()
    try:
        settings = make_settings(mock.url, store_url=redis.url, pipeline=PIPELINE, admin_token=None)
        running = await gateway_factory(settings)
        accounts = Accounts(running.gateway.store)
        tenant, key = await new_tenant(accounts, 1_000_000)
        client = running.openai(key)
        served: list[str] = []
        statuses: list[int] = []
        stop = asyncio.Event()

        async def worker() -> None:
            while not stop.is_set():
                try:
                    reply = await client.chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=3)
                    served.append(reply._request_id)
                    statuses.append(200)
                except openai.APIStatusError as exc:
                    statuses.append(exc.status_code)
                await asyncio.sleep(0.005)

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(0.7)
        outage = len(statuses)
        await asyncio.to_thread(redis.start)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
        await running.gateway.drain()
        assert set(statuses) <= {200, 503}, set(statuses)
        assert 503 in statuses and 200 in statuses[outage:]
        ledger = await accounts.ledger(tenant, limit=100_000)
        charged = {e["request_id"] for e in ledger if e["type"] == "charge"}
        assert set(served) <= charged, len(set(served) - charged)
        view = await assert_ledger_matches(accounts, tenant)
        assert view["reserved"] == 0
    finally:
        redis.stop()


ERROR_EVENT_BODIES = {
    "/chat/completions": {"messages": MESSAGES, "max_tokens": 20},
    "/responses": {"input": "hello world", "max_output_tokens": 20},
    "/messages": {"messages": MESSAGES, "max_tokens": 20},
}


@pytest.mark.parametrize("path", sorted(ERROR_EVENT_BODIES))
async def test_a_providers_error_event_mid_stream_is_charged_once_and_frees_the_hold(mock, gateway_factory, redis_prefix, path):
    """vLLM's `data: {"error": …}` after some output: every protocol's stream is settled, none left to the sweeper."""
    settings = make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, admin_token=None,
                             pipeline=["auth", "responses", "messages", "metering"])
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    tenant, key = await new_tenant(accounts, 1000)
    body = {"model": "sovereign-alpha", "stream": True, **ERROR_EVENT_BODIES[path]}
    headers = {"Authorization": f"Bearer {key}", "x-mock-error-after": "2", "x-mock-chunks": "10"}
    async with aiohttp.ClientSession() as http:
        async with http.post(running.v1 + path, json=body, headers=headers) as resp:
            assert resp.status == 200
            text = (await resp.read()).decode()
    assert "The model failed mid-stream." in text  # the client is told, in its protocol's error event
    await running.gateway.drain()
    view = await assert_ledger_matches(accounts, tenant)
    assert view["reserved"] == 0  # the hold is settled now, not released by the sweeper minutes later
    charges = [e for e in await accounts.ledger(tenant) if e["type"] == "charge"]
    assert len(charges) == 1 and charges[0]["usage_source"] == "estimated" and charges[0]["output_tokens"] >= 2
