"""Ledger retention folds old entries into one opening balance, keeping the sum equal to the balance; cursor paging."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp

from proxy.store.accounts import Accounts
from tests.support import ADMIN_TOKEN, REDIS_URL, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def chat(base_url: str, key: str, n: int) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as client:
        async def one(i: int) -> None:
            body = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3}
            async with client.post(base_url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
        await asyncio.gather(*(one(i) for i in range(n)))


async def next_second() -> float:
    """Wait (polling the clock) until created_at values can no longer equal the current second's."""
    now = int(time.time())
    while int(time.time()) == now:
        await asyncio.sleep(0.01)
    return float(int(time.time()))


async def assert_sums(accounts: Accounts, tenant: str) -> list[dict]:
    ledger = await accounts.ledger(tenant, limit=1000)
    view = await accounts.tenant(tenant)
    assert sum(e["credits"] for e in ledger) == view["balance"]
    assert ledger[0]["balance_after"] == view["balance"]
    return ledger


async def test_folding_keeps_the_sum_while_requests_run_on_two_replicas(mock, gateway_factory, redis_prefix):
    def settings():
        return make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"])

    replicas = [await gateway_factory(settings()), await gateway_factory(settings())]
    accounts = Accounts(replicas[0].gateway.store)
    tenant = "t-" + uuid.uuid4().hex[:8]
    await accounts.create_tenant(tenant, 100_000)
    key, _ = await accounts.create_key(tenant)
    await chat(replicas[0].base_url, key, 10)
    await accounts.add_credits(tenant, 500, "inv-1")
    await chat(replicas[1].base_url, key, 10)
    await replicas[0].gateway.drain()
    await replicas[1].gateway.drain()
    cutoff = await next_second()
    before = await assert_sums(accounts, tenant)
    assert len(before) == 22

    # Fold through the admin API while both replicas keep charging.
    async with aiohttp.ClientSession(base_url=replicas[1].base_url, headers=AUTH) as admin:
        fold = admin.post(f"/admin/tenants/{tenant}/ledger/fold", json={"before": cutoff})
        answer, *_ = await asyncio.gather(fold, chat(replicas[0].base_url, key, 10), chat(replicas[1].base_url, key, 10))
        assert (await answer.json())["folded_entries"] == 22
        answer.release()
        for replica in replicas:
            await replica.gateway.drain()
        after = await assert_sums(accounts, tenant)
        assert len(after) == 21
        opening = after[-1]
        assert opening["type"] == "opening_balance" and opening["folded_entries"] == 22
        assert opening["credits"] == sum(e["credits"] for e in before)
        assert opening["balance_after"] == before[0]["balance_after"]

        # A second fold takes the opening entry with it; folding again changes nothing.
        cutoff = await next_second()
        async with admin.post(f"/admin/tenants/{tenant}/ledger/fold", json={"before": cutoff}) as resp:
            assert (await resp.json())["folded_entries"] == 21
        ledger = await assert_sums(accounts, tenant)
        assert len(ledger) == 1 and ledger[0]["folded_entries"] == 42
        async with admin.post(f"/admin/tenants/{tenant}/ledger/fold", json={"before": cutoff}) as resp:
            assert (await resp.json())["folded_entries"] == 0
        async with admin.post(f"/admin/tenants/{tenant}/ledger/fold", json={}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "before"


async def test_the_background_task_folds_by_retention_days(mock, gateway_factory, redis_prefix):
    settings = make_settings(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"],
        ledger={"retention_days": 1 / 86400, "fold_interval_seconds": 0.05}, webhooks={"poll_seconds": 0.05},
    )
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    tenant = "t-" + uuid.uuid4().hex[:8]
    await accounts.create_tenant(tenant, 1000)
    key, _ = await accounts.create_key(tenant)
    await chat(running.base_url, key, 5)
    await running.gateway.drain()
    async with asyncio.timeout(10):
        while len(await accounts.ledger(tenant)) != 1:
            await asyncio.sleep(0.05)
    (opening,) = await assert_sums(accounts, tenant)
    assert opening["type"] == "opening_balance" and opening["folded_entries"] == 6


async def test_cursor_paging_is_stable_while_entries_arrive(mock, gateway_factory, redis_prefix):
    running = await gateway_factory(make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix))
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme", 1)
    for i in range(10):
        await accounts.add_credits("acme", 1, f"inv-{i}")
    seen: list[str] = []
    cursor = None
    async with aiohttp.ClientSession(base_url=running.base_url, headers=AUTH) as admin:
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            async with admin.get("/admin/tenants/acme/ledger", params=params) as resp:
                page = await resp.json()
            assert page["object"] == "list" and page["has_more"] == (page["next_cursor"] is not None)
            seen += [e["id"] for e in page["data"]]
            await accounts.add_credits("acme", 1, f"late-{len(seen)}")  # new entries do not shift the pages
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [f"topup:inv-{i}" for i in reversed(range(10))] + ["grant:acme"]
        for bad in ("x", "\u00b9", "\u0663"):  # "¹" and Arabic-Indic digits pass str.isdigit
            async with admin.get("/admin/tenants/acme/ledger", params={"cursor": bad}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["param"] == "cursor", bad
