"""The auth unit: every 401 case, model access, /v1/credits, tenant isolation, revocation bounds, key secrecy."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from proxy.store.accounts import Accounts
from tests.support import ADMIN_TOKEN, REDIS_URL, make_settings, settings_data, spawn_gateway

CHAT = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hello there"}]}


async def auth_gateway(mock, gateway_factory, store_url, prefix, **units):
    settings = make_settings(mock.url, store_url=store_url, prefix=prefix, pipeline=["auth", "rate_limit"], units=units)
    running = await gateway_factory(settings)
    return running, Accounts(running.gateway.store)


async def test_every_invalid_key_is_401_invalid_api_key(mock, gateway_factory, store_url, redis_prefix):
    running, accounts = await auth_gateway(mock, gateway_factory, store_url, redis_prefix)
    await accounts.create_tenant("acme", 100)
    revoked, record = await accounts.create_key("acme")
    await accounts.revoke_key(record.id)
    expired, _ = await accounts.create_key("acme", expires_at=time.time() - 1)
    unknown = "sk-sov-live-" + "A" * 40
    cases = {
        "unknown": unknown,
        "revoked": revoked,
        "expired": expired,
        "malformed": "sk-sov-live-short",
        "foreign": "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789",
    }
    for label, key in cases.items():
        client = running.openai(key)
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(**CHAT)
        assert info.value.status_code == 401, label
        assert info.value.code == "invalid_api_key", label
        assert info.value.body["type"] == "invalid_request_error"
        assert key not in info.value.response.text, label
        # Routes outside the pipeline authenticate the same way.
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    # No header at all, and a scheme other than Bearer (the SDK always sends Bearer, so raw HTTP here).
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": f"Basic {unknown}"}, {"Authorization": "Bearer"}):
            async with session.post(running.v1 + "/chat/completions", json=CHAT, headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 401
                assert body["error"]["code"] == "invalid_api_key"
                assert body["error"]["type"] == "invalid_request_error"
            async with session.get(running.v1 + "/credits", headers=headers) as resp:
                assert resp.status == 401
    assert mock.stats["requests"] == 0  # nothing reached the provider


async def test_an_authorization_header_that_is_not_utf8_is_a_401_not_a_crash(mock, gateway_factory, redis_prefix):
    """Raw bytes, as only a hand-written client sends them (aiohttp keeps them as surrogates)."""
    running, _ = await auth_gateway(mock, gateway_factory, REDIS_URL, redis_prefix)
    host, port = running.base_url.removeprefix("http://").split(":")
    body = b'{"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hi"}]}'
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer sk-sov-live-\xff\xfe" + b"a" * 40 + b"\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 ") and b'"invalid_api_key"' in answer
    assert mock.stats["requests"] == 0


async def test_valid_key_is_served_and_expiry_applies_to_a_cached_record(mock, gateway_factory, store_url, redis_prefix):
    running, accounts = await auth_gateway(mock, gateway_factory, store_url, redis_prefix, auth={"cache_seconds": 60})
    await accounts.create_tenant("acme", 100)
    key, _ = await accounts.create_key("acme", expires_at=time.time() + 1.5)
    client = running.openai(key)
    reply = await client.chat.completions.create(**CHAT)
    assert reply.choices[0].message.content
    # The provider never sees the client's key.
    assert key not in str(mock.requests[-1]["headers"])
    await asyncio.sleep(1.6)
    # The record is still cached (60 s), but expiry is checked on every request.
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(**CHAT)
    assert info.value.code == "invalid_api_key"


async def test_model_access_is_indistinguishable_from_unknown_model(mock, gateway_factory, store_url, redis_prefix):
    settings = make_settings(
        mock.url,
        store_url=store_url,
        prefix=redis_prefix,
        pipeline=["auth"],
        models={"sovereign-beta": {"upstream": "default", "free": True}},
    )
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme", 100)
    narrow, _ = await accounts.create_key("acme", models=["sovereign-beta"])
    wide, _ = await accounts.create_key("acme")
    narrow_client, wide_client = running.openai(narrow), running.openai(wide)

    assert [m.id for m in (await narrow_client.models.list()).data] == ["sovereign-beta"]
    assert sorted(m.id for m in (await wide_client.models.list()).data) == ["sovereign-alpha", "sovereign-beta"]
    with pytest.raises(openai.NotFoundError) as forbidden:
        await narrow_client.models.retrieve("sovereign-alpha")
    assert forbidden.value.code == "model_not_found"

    with pytest.raises(openai.NotFoundError) as forbidden:
        await narrow_client.chat.completions.create(**CHAT)
    with pytest.raises(openai.NotFoundError) as unknown:
        await narrow_client.chat.completions.create(**{**CHAT, "model": "no-such-model"})
    assert forbidden.value.body == {
        **unknown.value.body,
        "message": unknown.value.body["message"].replace("no-such-model", "sovereign-alpha"),
    }
    assert (await narrow_client.chat.completions.create(**{**CHAT, "model": "sovereign-beta"})).choices
    assert (await wide_client.chat.completions.create(**CHAT)).choices
    assert mock.stats["requests"] == 2


async def test_credits_shows_only_the_callers_tenant(mock, gateway_factory, store_url, redis_prefix):
    running, accounts = await auth_gateway(mock, gateway_factory, store_url, redis_prefix)
    await accounts.create_tenant("acme", 1000)
    await accounts.create_tenant("globex", 7)
    expires = int(time.time()) + 3600
    acme_key, acme_record = await accounts.create_key(
        "acme", name="ci", models=["sovereign-alpha"], rpm=100, max_concurrency=4, expires_at=expires
    )
    globex_key, _ = await accounts.create_key("globex")
    async with aiohttp.ClientSession() as session:
        async with session.get(running.v1 + "/credits", headers={"Authorization": f"Bearer {acme_key}"}) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "object": "credits",
                "tenant": "acme",
                "balance": 1000,
                "reserved": 0,
                "available": 1000,
                "key": {
                    "id": acme_record.id,
                    "name": "ci",
                    "models": ["sovereign-alpha"],
                    "rpm": 100,
                    "max_concurrency": 4,
                    "expires_at": expires,
                    "budget": None,
                },
            }
        async with session.get(running.v1 + "/credits", headers={"Authorization": f"Bearer {globex_key}"}) as resp:
            body = await resp.json()
            assert (body["tenant"], body["balance"], body["key"]["models"]) == ("globex", 7, [])
        # A client key is no admin token: nothing of another tenant is reachable through /admin.
        for method, path in [("GET", "/admin/tenants/globex"), ("GET", "/admin/keys?tenant=globex"),
                             ("GET", "/admin/tenants/globex/ledger"), ("POST", "/admin/tenants/globex/credits")]:
            async with session.request(method, running.base_url + path, json={"amount": 5},
                                       headers={"Authorization": f"Bearer {acme_key}"}) as resp:
                assert resp.status == 401, path
    assert (await accounts.tenant("globex"))["balance"] == 7


async def test_no_plaintext_key_in_redis_or_in_the_logs(mock, redis_prefix, tmp_path):
    data = settings_data(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "rate_limit"],
        logging={"level": "info", "access_log": True},
    )
    proc, base = await spawn_gateway(data, tmp_path)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            async with admin.post(base + "/admin/tenants", json={"id": "acme", "credits": 50}) as resp:
                assert resp.status == 201
            async with admin.post(base + "/admin/keys", json={"tenant": "acme", "rpm": 100, "max_concurrency": 5}) as resp:
                created = await resp.json()
        key = created["key"]
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        await client.chat.completions.create(**CHAT)
        stream = await client.chat.completions.create(**CHAT, stream=True)
        async for _ in stream:
            pass
        await client.models.list()
        wrong = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key[:-1] + ("x" if key[-1] != "x" else "y"), max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        await client.close()
        await wrong.close()

        redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
        values = []
        async for name in redis.scan_iter(match=f"{redis_prefix}:*", count=1000):
            values.append(name)
            kind = await redis.type(name)
            if kind == "string":
                values.append(await redis.get(name))
            elif kind == "hash":
                values.extend(f"{k}={v}" for k, v in (await redis.hgetall(name)).items())
            elif kind == "list":
                values.extend(await redis.lrange(name, 0, -1))
            elif kind == "set":
                values.extend(await redis.smembers(name))
            elif kind == "zset":
                values.extend(m for m, _ in await redis.zrange(name, 0, -1, withscores=True))
            else:
                raise AssertionError(f"unexpected type {kind} of {name}")
        await redis.aclose()
        assert len(values) > 5  # tenant, ledger, key record, id index, key set, rate-limit log
        secret = key.removeprefix("sk-sov-live-")
        assert not [v for v in values if secret[:16] in v]
    finally:
        proc.signal(15)
        proc.wait(15)
    output = proc.output()
    assert '"path":"/v1/chat/completions"' in output.replace(" ", "")  # the access log was on
    assert secret[:16] not in output


async def test_revocation_reaches_every_replica_within_cache_seconds(mock, redis_prefix, shared_store, replicas):
    cache_seconds = 1.0
    data = settings_data(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth"], units={"auth": {"cache_seconds": cache_seconds}}
    )
    gateways = await replicas(data, 2)
    accounts = Accounts(shared_store)
    await accounts.create_tenant("acme", 0)
    key, record = await accounts.create_key("acme")
    clients = [openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0) for _, base in gateways]
    for client in clients:  # both replicas now hold the key in their cache
        assert (await client.models.list()).data
    await accounts.revoke_key(record.id)
    revoked_at = time.monotonic()
    refused_after = {}
    while len(refused_after) < 2 and time.monotonic() - revoked_at < cache_seconds + 2:
        for i, client in enumerate(clients):
            if i in refused_after:
                continue
            try:
                await client.models.list()
            except openai.AuthenticationError as exc:
                assert exc.code == "invalid_api_key"
                refused_after[i] = time.monotonic() - revoked_at
        await asyncio.sleep(0.05)
    assert sorted(refused_after) == [0, 1]
    assert max(refused_after.values()) <= cache_seconds + 0.3
    for client in clients:
        await client.close()


async def test_the_key_cache_is_bounded(mock, gateway_factory, redis_prefix):
    running, accounts = await auth_gateway(mock, gateway_factory, "memory://", redis_prefix, auth={"cache_entries": 3})
    unit = running.gateway.unit("auth")
    for i in range(10):
        with pytest.raises(openai.AuthenticationError):
            await running.openai("sk-sov-live-" + str(i) * 40).models.list()
    assert len(unit._cache) == 3


async def test_a_burst_with_a_cold_cache_reads_each_key_once(mock, gateway_factory, redis_prefix):
    """Hundreds of simultaneous requests with one uncached key share one store read."""
    import asyncio as _asyncio

    from proxy.store.accounts import Accounts
    from tests.support import REDIS_URL, make_settings

    running = await gateway_factory(
        make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth"], admin_token=None)
    )
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("burst", 0)
    key, _ = await accounts.create_key("burst")
    unit = running.gateway.unit("auth")
    reads = 0
    original = unit.accounts.lookup_digest

    async def counting(digest):
        nonlocal reads
        reads += 1
        return await original(digest)

    unit.accounts.lookup_digest = counting
    client = running.openai(key)
    results = await _asyncio.gather(*(client.models.list() for _ in range(300)))
    assert all(page.data for page in results)
    assert reads == 1
