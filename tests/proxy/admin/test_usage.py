"""Usage aggregates written by the settlement script equal the ledger, for any grouping, across two replicas."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import time
import uuid
from collections import Counter

import aiohttp

from proxy.store.accounts import Accounts
from tests.support import ADMIN_TOKEN, REDIS_URL, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODELS = {
    "sovereign-alpha": {"upstream": "default", "price": {"input_per_million": 1_000_000, "output_per_million": 2_000_000}},
    "sovereign-beta": {"upstream": "default", "price": {"input_per_million": 3_000_000, "output_per_million": 5_000_000}},
    "sovereign-free": {"upstream": "default", "free": True},
}
GROUPINGS = [
    (), ("hour",), ("day",), ("model",), ("key",), ("model", "key"), ("hour", "model"), ("day", "key"), ("hour", "model", "key"),
]


async def two_replicas(gateway_factory, mock, redis_prefix):
    def settings():
        return make_settings(
            mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"], models=MODELS,
            units={"auth": {"cache_seconds": 0}},
        )

    return await gateway_factory(settings()), await gateway_factory(settings())


async def mixed_load(replicas, keys: list[str], requests: int) -> None:
    clients = [replica.openai(key) for replica in replicas for key in keys]
    models = itertools.cycle(["sovereign-alpha", "sovereign-beta", "sovereign-free"])

    async def one(index: int) -> None:
        client = clients[index % len(clients)]
        model = next(models)
        messages = [{"role": "user", "content": "count " + "x " * (index % 7)}]
        if index % 2:
            stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=3 + index % 4, stream=True)
            async for _ in stream:
                pass
        else:
            await client.chat.completions.create(model=model, messages=messages, max_tokens=3 + index % 4)

    await asyncio.gather(*(one(i) for i in range(requests)))
    for replica in replicas:
        await replica.gateway.drain()


def ledger_totals(entries: list[dict], group: tuple[str, ...], start: int, end: int) -> Counter:
    """Credits charged per group, from the ledger alone."""
    totals: Counter = Counter()
    for entry in entries:
        if entry["type"] != "charge" or not start <= entry["created_at"] < end:
            continue
        at = entry["created_at"]
        parts = []
        if "hour" in group:
            parts.append(at - at % 3600)
        if "day" in group:
            parts.append(at - at % 86400)
        if "key" in group:
            parts.append(entry["key_id"])
        if "model" in group:
            parts.append(entry["model"])
        totals[tuple(parts)] += -entry["credits"]
        totals[("requests", *parts)] += 1
        totals[("tokens", *parts)] += entry["input_tokens"] + entry["output_tokens"]
    return totals


def usage_totals(rows: list[dict], group: tuple[str, ...]) -> Counter:
    totals: Counter = Counter()
    for row in rows:
        parts = []
        if "hour" in group or "day" in group:
            parts.append(row["start"])
        if "key" in group:
            parts.append(row["key_id"])
        if "model" in group:
            parts.append(row["model"])
        totals[tuple(parts)] += row["credits"]
        totals[("requests", *parts)] += row["requests"]
        totals[("tokens", *parts)] += row["input_tokens"] + row["output_tokens"]
    return totals


async def test_aggregates_equal_the_ledger_for_every_grouping(mock, gateway_factory, redis_prefix):
    replicas = await two_replicas(gateway_factory, mock, redis_prefix)
    accounts = Accounts(replicas[0].gateway.store)
    tenant, other = "t-" + uuid.uuid4().hex[:8], "o-" + uuid.uuid4().hex[:8]
    await accounts.create_tenant(tenant, 1_000_000)
    await accounts.create_tenant(other, 1_000_000)
    keys = [(await accounts.create_key(tenant, name=f"k{i}"))[0] for i in range(2)]
    other_key, _ = await accounts.create_key(other)
    await mixed_load(replicas, keys, 60)
    await mixed_load(replicas[:1], [other_key], 6)

    entries = await accounts.ledger(tenant, limit=10_000)
    view = await accounts.tenant(tenant)
    assert sum(e["credits"] for e in entries) == view["balance"]
    start, end = int(time.time()) - 7200, int(time.time()) + 3600
    start -= start % 3600
    end -= end % 3600
    async with aiohttp.ClientSession(base_url=replicas[1].base_url, headers=AUTH) as admin:
        for group in GROUPINGS:
            params = {"tenant": tenant, "start": str(start), "end": str(end), "group_by": ",".join(group)}
            async with admin.get("/admin/usage", params=params) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            assert body["object"] == "list"
            for row in body["data"]:
                assert row["tenant"] == tenant
                assert set(row) >= {"start", "end", "tenant", "requests", "input_tokens", "output_tokens", "credits"}
                assert ("key_id" in row) == ("key" in group) and ("model" in row) == ("model" in group)
            assert usage_totals(body["data"], group) == ledger_totals(entries, group, start, end), group

        # Per key: the `key` filter answers that key's share only.
        key_ids = {e["key_id"] for e in entries if e["type"] == "charge"}
        assert len(key_ids) == 2
        for key_id in key_ids:
            params = {"tenant": tenant, "start": str(start), "end": str(end), "key": key_id, "group_by": "model"}
            async with admin.get("/admin/usage", params=params) as resp:
                rows = (await resp.json())["data"]
            mine = [e for e in entries if e.get("key_id") == key_id]
            assert usage_totals(rows, ("model",)) == ledger_totals(mine, ("model",), start, end)
            assert sum(r["requests"] for r in rows if r["model"] == "sovereign-free") > 0

        # ISO dates give the same answer as unix seconds; CSV carries the same numbers.
        day = time.strftime("%Y-%m-%d", time.gmtime(start))
        async with admin.get("/admin/usage", params={"tenant": tenant, "start": day, "group_by": "model"}) as resp:
            iso = (await resp.json())["data"]
        assert sum(r["credits"] for r in iso) == -sum(e["credits"] for e in entries if e["type"] == "charge")
        async with admin.get("/admin/usage", params={"tenant": tenant, "start": day, "group_by": "model", "format": "csv"}) as resp:
            assert resp.content_type == "text/csv"
            rows = list(csv.DictReader(io.StringIO(await resp.text())))
        assert [(r["model"], int(r["credits"])) for r in rows] == [(r["model"], r["credits"]) for r in iso]

        # "¹" passes str.isdigit but not int(); 5,000 digits pass both but are no time.
        for bad in ({"group_by": "week"}, {"start": "yesterday"}, {"format": "xml"}, {"group_by": "hour,day"},
                    {"start": "\u00b9"}, {"end": "-\u0663"}, {"start": "9" * 5000}):
            async with admin.get("/admin/usage", params={"tenant": tenant, **bad}) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["param"] in ("group_by", "start", "end", "format"), bad
        async with admin.get("/admin/usage", params={"tenant": "nobody"}) as resp:
            assert resp.status == 404

    # /v1/usage: a client key sees its own tenant, never another's.
    async with aiohttp.ClientSession(base_url=replicas[0].base_url) as client:
        async with client.get("/v1/usage", params={"group_by": "key"}, headers={"Authorization": f"Bearer {keys[0]}"}) as resp:
            mine = (await resp.json())["data"]
        assert {r["tenant"] for r in mine} == {tenant} and {r["key_id"] for r in mine} == key_ids
        async with client.get("/v1/usage", params={"tenant": tenant}, headers={"Authorization": f"Bearer {other_key}"}) as resp:
            theirs = (await resp.json())["data"]
        assert {r["tenant"] for r in theirs} == {other}
        assert sum(r["requests"] for r in theirs) == 6
        async with client.get("/v1/usage") as resp:
            assert resp.status == 401


async def test_aggregates_on_the_embedded_store(mock, gateway_factory):
    running = await gateway_factory(make_settings(mock.url, store_url="memory://", pipeline=["auth", "metering"], models=MODELS))
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme", 10_000)
    key, _ = await accounts.create_key("acme")
    await mixed_load([running], [key], 6)
    entries = await accounts.ledger("acme", limit=100)
    async with aiohttp.ClientSession(base_url=running.base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        async with client.get("/v1/usage", params={"group_by": "model"}) as resp:
            rows = (await resp.json())["data"]
    assert usage_totals(rows, ("model",)) == ledger_totals(entries, ("model",), 0, 2**40)
