"""Webhooks reach a real HTTP receiver, signed; failures are retried; two replicas send one event per crossing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid

import aiohttp
import orjson
from aiohttp import web

from proxy.store.accounts import Accounts
from proxy.store.events import events_key, pending_key
from tests.support import ADMIN_TOKEN, REDIS_URL, make_settings, until

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SECRET = "whsec-test-0123456789"


class Receiver:
    """A webhook endpoint on loopback that records what it got and can refuse the first attempts."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.attempts: list[tuple[dict[str, str], bytes]] = []
        self.accepted: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts.append((dict(request.headers), body))
        if len(self.attempts) <= self.fail_first:
            return web.Response(status=500)
        self.accepted.append({"headers": dict(request.headers), "body": body, "event": orjson.loads(body)})
        return web.Response(status=204)

    def of(self, kind: str) -> list[dict]:
        return [a["event"] for a in self.accepted if a["event"]["type"] == kind]


async def serve(receiver: Receiver) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/hooks"


def verify(headers: dict[str, str], body: bytes) -> bool:
    parts = dict(item.split("=", 1) for item in headers["Sovereign-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(parts["v1"], expected) and abs(int(parts["t"]) - time.time()) < 60


async def replicas_with_webhooks(gateway_factory, mock, redis_prefix, url: str, n: int = 2):
    def settings():
        return make_settings(
            mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"],
            units={"auth": {"cache_seconds": 0}},
            webhooks={"url": url, "secret": SECRET, "poll_seconds": 0.05, "retry_seconds": 0.1, "lease_seconds": 2},
        )

    return [await gateway_factory(settings()) for _ in range(n)]


async def settled(replicas, accounts: Accounts, tenant: str) -> None:
    """Every settlement written and every event delivered."""
    for replica in replicas:
        await replica.gateway.drain()
    store = accounts.store

    async def empty() -> bool:
        return not await store.redis.llen(events_key(store, tenant)) and not await store.redis.sismember(pending_key(store), tenant)

    async with asyncio.timeout(10):
        while not await empty():
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # several poll intervals: a duplicate would arrive now


async def chat(base_url: str, key: str, n: int) -> list[int]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as client:
        async def one(i: int) -> int:
            body = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4}
            async with client.post(base_url + "/v1/chat/completions", json=body) as resp:
                return resp.status
        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_two_replicas_send_one_signed_event_per_crossing(mock, gateway_factory, redis_prefix):
    receiver = Receiver()
    runner, url = await serve(receiver)
    try:
        replicas = await replicas_with_webhooks(gateway_factory, mock, redis_prefix, url)
        accounts = Accounts(replicas[0].gateway.store)
        tenant = "t-" + uuid.uuid4().hex[:8]
        async with aiohttp.ClientSession(headers=AUTH) as admin:
            async with admin.post(replicas[0].base_url + "/admin/tenants", json={"id": tenant, "credits": 5000, "low_balance_threshold": 4700}) as resp:
                assert (await resp.json())["low_balance_threshold"] == 4700
            key, _ = await accounts.create_key(tenant)
            # ~20 credits a request: 40 concurrent requests over both replicas cross 4700 once.
            both = await asyncio.gather(chat(replicas[0].base_url, key, 20), chat(replicas[1].base_url, key, 20))
            statuses = both[0] + both[1]
            assert set(statuses) == {200}
            await settled(replicas, accounts, tenant)
            low = receiver.of("tenant.balance_low")
            assert len(low) == 1, low
            assert low[0]["data"]["tenant"] == tenant and low[0]["data"]["threshold"] == 4700 and low[0]["data"]["balance"] < 4700
            assert all(verify(a["headers"], a["body"]) for a in receiver.accepted)

            # A top-up is an event; spending below the threshold again is a new crossing.
            async with admin.post(replicas[1].base_url + f"/admin/tenants/{tenant}/credits", json={"amount": 500}) as resp:
                balance = (await resp.json())["balance"]
            async with admin.patch(replicas[1].base_url + f"/admin/tenants/{tenant}", json={"low_balance_threshold": balance - 30}) as resp:
                assert resp.status == 200
            await chat(replicas[0].base_url, key, 3)
            await chat(replicas[1].base_url, key, 3)
            await settled(replicas, accounts, tenant)
            assert [e["data"]["amount"] for e in receiver.of("tenant.credits_added")] == [500]
            assert len(receiver.of("tenant.balance_low")) == 2
            ids = [a["event"]["id"] for a in receiver.accepted]
            assert len(ids) == len(set(ids))
    finally:
        await runner.cleanup()


async def test_a_failing_receiver_is_retried_and_budget_exhaustion_is_sent(mock, gateway_factory, redis_prefix):
    receiver = Receiver(fail_first=3)
    runner, url = await serve(receiver)
    try:
        replicas = await replicas_with_webhooks(gateway_factory, mock, redis_prefix, url, n=1)
        accounts = Accounts(replicas[0].gateway.store)
        tenant = "t-" + uuid.uuid4().hex[:8]
        await accounts.create_tenant(tenant, 10_000)
        key, record = await accounts.create_key(tenant, budget_credits=30, budget_period="day")
        statuses = []
        for _ in range(6):
            statuses += await chat(replicas[0].base_url, key, 1)
            await replicas[0].gateway.drain()
        assert statuses[0] == 200 and statuses[-1] == 402
        await until(lambda: bool(receiver.accepted), timeout=10)
        await settled(replicas, accounts, tenant)
        assert len(receiver.attempts) == 4  # three refusals, then the same event again
        assert len({body for _, body in receiver.attempts}) == 1 and verify(*receiver.attempts[0])
        (event,) = receiver.of("key.budget_exhausted")
        assert event["data"]["key_id"] == record.id and event["data"]["budget"] == 30 and event["data"]["spent"] >= 30
        assert (event["data"]["period"], event["data"]["period_start"]) == ("day", time.strftime("%Y-%m-%d", time.gmtime()))

        for period, start in (("month", time.strftime("%Y-%m", time.gmtime())), ("total", None)):
            key, record = await accounts.create_key(tenant, budget_credits=30, budget_period=period)
            while (await chat(replicas[0].base_url, key, 1)) == [200]:
                await replicas[0].gateway.drain()
            await until(lambda: any(e["data"]["key_id"] == record.id for e in receiver.of("key.budget_exhausted")), timeout=10)
            (event,) = [e for e in receiver.of("key.budget_exhausted") if e["data"]["key_id"] == record.id]
            assert (event["data"]["period"], event["data"].get("period_start")) == (period, start)
    finally:
        await runner.cleanup()


async def test_without_webhooks_no_events_are_kept(mock, gateway_factory, redis_prefix):
    running = await gateway_factory(make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"]))
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme", 100, low_balance_threshold=90)
    key, _ = await accounts.create_key("acme")
    await chat(running.base_url, key, 2)
    await running.gateway.drain()
    assert await accounts.store.redis.llen(events_key(accounts.store, "acme")) == 0


async def test_a_top_up_made_with_the_cli_is_an_event_too(mock, gateway_factory, redis_prefix):
    """The CLI is given the store's URL, not the webhook settings: its top-ups used to record no event."""
    import os
    import subprocess
    import sys

    from tests.support import REPO

    receiver = Receiver()
    runner, url = await serve(receiver)
    try:
        (replica,) = await replicas_with_webhooks(gateway_factory, mock, redis_prefix, url, n=1)
        tenant = "t-" + uuid.uuid4().hex[:8]
        await Accounts(replica.gateway.store).create_tenant(tenant, 10)
        env = {**os.environ, "SOVEREIGN_STORE_URL": REDIS_URL, "SOVEREIGN_STORE__PREFIX": redis_prefix}
        env.pop("SOVEREIGN_CONFIG", None)
        cli = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "tenants", "topup", tenant, "500"],
                                      cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        await until(lambda: receiver.of("tenant.credits_added"), timeout=10)
        (event,) = receiver.of("tenant.credits_added")
        assert event["data"]["tenant"] == tenant and event["data"]["amount"] == 500
    finally:
        await runner.cleanup()


async def test_events_past_the_cap_are_dropped_and_logged(mock, gateway_factory, redis_prefix, capsys):
    """A receiver down long enough: the oldest of more than 10,000 waiting events go, and now the log says how many."""
    (replica,) = await replicas_with_webhooks(gateway_factory, mock, redis_prefix, "http://127.0.0.1:9/down", n=1)
    store = replica.gateway.store
    accounts = Accounts(store, events=True)
    tenant = "t-" + uuid.uuid4().hex[:8]
    await accounts.create_tenant(tenant, 0)
    events = events_key(store, tenant)
    # 9,998 waiting already (written directly: 10,000 top-ups would take long), then three top-ups.
    async with store.redis.pipeline(transaction=False) as pipe:
        for i in range(9_998):
            pipe.lpush(events, orjson.dumps({"id": f"evt_old_{i}", "type": "tenant.credits_added", "created_at": int(time.time())}))
        await pipe.execute()
    for n in range(3):
        await accounts.add_credits(tenant, 1, f"cap-{n}")
    assert await store.redis.llen(events) == 10_000
    await until(lambda: "webhooks.dropped" in capsys.readouterr().out, timeout=10)
    assert int(await store.redis.hget(store.tenant_key(tenant, "tenant"), "events_dropped") or 0) == 0


async def test_a_crossing_in_a_lease_batch_is_delivered_at_once(mock, gateway_factory, redis_prefix):
    """A busy tenant's charges go in lease batches; their balance_low used to wait for the minute-long sweep."""
    receiver = Receiver()
    runner, url = await serve(receiver)
    try:
        settings = make_settings(
            mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"],
            units={"auth": {"cache_seconds": 0}, "metering": {"lease_min_rate": 1}},
            webhooks={"url": url, "secret": SECRET, "poll_seconds": 0.05, "retry_seconds": 0.1, "lease_seconds": 2},
        )
        running = await gateway_factory(settings)
        accounts = Accounts(running.gateway.store)
        tenant = "t-" + uuid.uuid4().hex[:8]
        await accounts.create_tenant(tenant, 1_000_000)
        key, _ = await accounts.create_key(tenant)
        for _ in range(3):  # the tenant gets busy enough for a lease
            assert set(await chat(running.base_url, key, 100)) == {200}
        await asyncio.sleep(0.1)  # the last batch written (a drain would give the lease back)
        leased = running.gateway.metrics.leased_charges._value.get()
        assert leased > 0
        threshold = (await accounts.tenant(tenant))["balance"] - 500  # ~20 credits a request: crossed in a batch
        await accounts.update_tenant(tenant, threshold)
        assert set(await chat(running.base_url, key, 100)) == {200}
        assert running.gateway.metrics.leased_charges._value.get() > leased
        async with asyncio.timeout(5):  # the sweep that used to find it runs every 60 s
            while not receiver.of("tenant.balance_low"):
                await asyncio.sleep(0.05)
        (event,) = receiver.of("tenant.balance_low")
        assert event["data"]["threshold"] == threshold and event["data"]["balance"] < threshold
    finally:
        await runner.cleanup()
