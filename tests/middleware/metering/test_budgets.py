"""Per-key budgets: enforced atomically in the hold script, across replicas, for that key only."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import orjson

from middleware.metering.pricing import pricing_table, prompt_estimate
from proxy.store.accounts import Accounts
from tests.support import ADMIN_TOKEN, REDIS_URL, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BUDGET = 300


def body(index: int) -> bytes:
    return orjson.dumps({"model": "sovereign-alpha", "messages": [{"role": "user", "content": f"hi {index}"}], "max_tokens": 8})


async def test_budget_holds_under_200_concurrent_requests_across_two_replicas(mock, gateway_factory, redis_prefix):
    def settings():
        return make_settings(
            mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"],
            units={"auth": {"cache_seconds": 0}, "metering": {"speculative_hold": False}},
        )

    replicas = [await gateway_factory(settings()), await gateway_factory(settings())]
    accounts = Accounts(replicas[0].gateway.store)
    tenant = "t-" + uuid.uuid4().hex[:8]
    await accounts.create_tenant(tenant, 1_000_000)
    async with aiohttp.ClientSession(headers=AUTH) as admin:
        async with admin.post(replicas[0].base_url + "/admin/keys", json={"tenant": tenant, "budget": {"credits": BUDGET, "period": "day"}}) as resp:
            assert resp.status == 201
            capped = await resp.json()
        assert capped["budget"] == {"credits": BUDGET, "period": "day"}
        other, _ = await accounts.create_key(tenant, name="unlimited")

        async def send(index: int, key: str) -> tuple[int, dict]:
            url = replicas[index % 2].base_url + "/v1/chat/completions"
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            async with aiohttp.ClientSession() as client, client.post(url, data=body(index), headers=headers) as resp:
                return resp.status, await resp.json()

        results = await asyncio.gather(*(send(i, capped["key"]) for i in range(200)))
        for replica in replicas:
            await replica.gateway.drain()
        statuses = [status for status, _ in results]
        assert set(statuses) == {200, 402}, statuses
        refusals = [b["error"] for s, b in results if s == 402]
        assert {(e["code"], e["type"]) for e in refusals} == {("key_budget_exceeded", "invalid_request_error")}

        # What the key spent, from the ledger, exceeds the budget by less than one request's hold.
        pricing = pricing_table(replicas[0].gateway.settings)["sovereign-alpha"]
        largest_hold = max(pricing.cost(prompt_estimate(len(body(i)), 1, 3.0), 8) for i in range(200))
        ledger = await accounts.ledger(tenant, limit=1000)
        spent = -sum(e["credits"] for e in ledger if e.get("key_id") == capped["id"])
        assert statuses.count(200) == sum(1 for e in ledger if e.get("key_id") == capped["id"])
        assert spent < BUDGET + largest_hold, (spent, largest_hold)
        # Open holds made the burst stop early; one at a time the key spends up to its budget.
        served = 0
        while (await send(served, capped["key"]))[0] == 200:
            served += 1
            for replica in replicas:  # one at a time: the last charge has landed before the next hold
                await replica.gateway.drain()
        for replica in replicas:
            await replica.gateway.drain()
        ledger = await accounts.ledger(tenant, limit=1000)
        spent = -sum(e["credits"] for e in ledger if e.get("key_id") == capped["id"])
        assert BUDGET <= spent < BUDGET + largest_hold, (spent, largest_hold)
        async with admin.get(replicas[1].base_url + f"/admin/keys/{capped['id']}") as resp:
            assert (await resp.json())["budget"] == {"credits": BUDGET, "period": "day", "spent": spent, "held": 0}

        # The tenant's other key keeps working; the capped one stays refused.
        assert (await send(0, other))[0] == 200
        status, refused = await send(1, capped["key"])
        assert (status, refused["error"]["code"]) == (402, "key_budget_exceeded")

        # Raising the budget (PATCH) lets the key spend again; clearing it removes the cap.
        # A new amount alone keeps the period and what was spent in it.
        async with admin.patch(replicas[0].base_url + f"/admin/keys/{capped['id']}", json={"budget": {"credits": spent + 1000}, "rpm": 1000}) as resp:
            patched = await resp.json()
        assert patched["budget"] == {"credits": spent + 1000, "period": "day", "spent": spent, "held": 0}
        assert patched["rpm"] == 1000
        assert (await send(0, capped["key"]))[0] == 200
        async with admin.patch(replicas[0].base_url + f"/admin/keys/{capped['id']}", json={"budget": None}) as resp:
            assert (await resp.json())["budget"] is None
        async with admin.patch(replicas[0].base_url + f"/admin/keys/{capped['id']}", json={"budget": {"credits": 5, "period": "week"}}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "budget.period"
        async with admin.patch(replicas[0].base_url + "/admin/keys/key_nope", json={"name": "x"}) as resp:
            assert resp.status == 404


async def test_released_and_expired_holds_give_the_budget_back(mock, gateway_factory, redis_prefix):
    """A request that fails upstream releases its key hold, so a small budget is not eaten by failures."""
    running = await gateway_factory(make_settings(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"], units={"auth": {"cache_seconds": 0}},
    ))
    accounts = Accounts(running.gateway.store)
    tenant = "t-" + uuid.uuid4().hex[:8]
    await accounts.create_tenant(tenant, 10_000)
    key, record = await accounts.create_key(tenant, budget_credits=60, budget_period="month")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(base_url=running.base_url, headers=headers) as client:
        for _ in range(5):
            async with client.post("/v1/chat/completions", data=body(1), headers={"x-mock-fail-status": "500"}) as resp:
                assert resp.status >= 500
        async with client.post("/v1/chat/completions", data=body(1)) as resp:
            assert resp.status == 200
    await running.gateway.drain()
    spending = await accounts.key_spending(await accounts.get_key(record.id))
    assert spending["held"] == 0 and 0 < spending["spent"] < 60
    # The client sees what is left of its budget (it used to see the budget without what was spent).
    async with aiohttp.ClientSession(base_url=running.base_url, headers=headers) as client:
        async with client.get("/v1/credits") as resp:
            assert (await resp.json())["key"]["budget"] == {"credits": 60, "period": "month", **spending}
    assert time.strftime("m:%Y%m", time.gmtime()) == (await running.gateway.store.redis.hget(
        running.gateway.store.tenant_key(tenant, "budget", record.id), "period"))


async def test_a_budget_set_mid_period_counts_what_the_key_already_spent(mock, gateway_factory, redis_prefix):
    """Spending used to be counted only while a key had a budget: a budget set (or set again, or given
    another period) after the key had spent started from zero, and the key could spend it on top."""
    running = await gateway_factory(make_settings(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"], units={"auth": {"cache_seconds": 0}},
    ))
    accounts = Accounts(running.gateway.store)
    tenant = "t-" + uuid.uuid4().hex[:8]
    await accounts.create_tenant(tenant, 100_000)
    key, record = await accounts.create_key(tenant)  # no budget
    other, _ = await accounts.create_key(tenant)  # the tenant's other key: its spending is not this key's
    async with aiohttp.ClientSession(base_url=running.base_url) as client:
        async def chat(plaintext: str) -> int:
            headers = {"Authorization": f"Bearer {plaintext}", "Content-Type": "application/json"}
            async with client.post("/v1/chat/completions", data=body(1), headers=headers) as resp:
                await resp.read()
                return resp.status

        assert [await chat(key) for _ in range(3)] == [200] * 3
        assert await chat(other) == 200
        await running.gateway.drain()
        spent = sum(-e["credits"] for e in await accounts.ledger(tenant) if e["type"] == "charge" and e["key_id"] == record.id)
        assert spent > 0
        for budget in ({"credits": spent + 1, "period": "day"}, {"credits": spent + 1, "period": "month"},
                       {"credits": spent + 1, "period": "total"}, None, {"credits": spent, "period": "day"}):
            updated = await accounts.update_key(record.id, {"budget": budget})
            if budget is None:
                continue
            assert (await accounts.key_spending(updated))["spent"] == spent, budget
        # What it spent before the budget counts: the budget is used up.
        assert await chat(key) == 402
        assert await chat(other) == 200
