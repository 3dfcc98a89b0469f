"""Accounts on the store: tenants, idempotent top-ups, the ledger, and hashed API keys (Redis and memory://)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from proxy.store.accounts import KEY_PREFIX, Accounts, hash_key, looks_like_key
from proxy.core.errors import ApiError
from proxy.core.settings import StoreSettings
from proxy.store.events import events_key
from proxy.store.store import Store


@pytest.fixture
async def accounts(store_url, redis_prefix):
    store = Store(StoreSettings(url=store_url, prefix=redis_prefix))
    await store.connect()
    yield Accounts(store)
    await store.close()


async def test_tenant_lifecycle_and_ledger(accounts):
    tenant = await accounts.create_tenant("acme", 100)
    assert {k: tenant[k] for k in ("id", "balance", "reserved", "available")} == {
        "id": "acme", "balance": 100, "reserved": 0, "available": 100,
    }
    with pytest.raises(ApiError) as exists:
        await accounts.create_tenant("acme", 5)
    assert exists.value.status == 409
    # Concurrent top-ups with the same idempotency key apply once; distinct keys all apply.
    results = await asyncio.gather(*(accounts.add_credits("acme", 10, "same") for _ in range(20)))
    assert sum(applied for applied, _ in results) == 1
    await asyncio.gather(*(accounts.add_credits("acme", 1, f"k{i}") for i in range(20)))
    assert (await accounts.tenant("acme"))["balance"] == 130
    ledger = await accounts.ledger("acme", 1000)
    assert len(ledger) == 22
    assert sum(e["credits"] for e in ledger) == 130  # the ledger sums to the balance
    assert ledger[0]["balance_after"] == 130 and ledger[-1]["type"] == "grant"
    assert len(await accounts.ledger("acme", 3)) == 3
    for call in (accounts.tenant("nobody"), accounts.ledger("nobody"), accounts.add_credits("nobody", 1, "x")):
        with pytest.raises(ApiError) as missing:
            await call
        assert missing.value.status == 404


async def test_large_balances_are_exact_in_the_ledger(accounts):
    """Balances past 10^14 (within MAX_CREDITS) are written as integers, not as Lua's 1.2e+14: ledger and events."""
    big = 10**15 - 7
    await accounts.create_tenant("whale", big)
    await Accounts(accounts.store, events=True).add_credits("whale", 3, "top-up")
    ledger = await accounts.ledger("whale", 10)
    assert [e["balance_after"] for e in ledger] == [big + 3, big]
    assert (await accounts.tenant("whale"))["balance"] == big + 3
    [event] = [orjson.loads(e) for e in await accounts.store.redis.lrange(events_key(accounts.store, "whale"), 0, -1)]
    assert (event["type"], event["data"]["balance"]) == ("tenant.credits_added", big + 3)


async def test_keys_are_stored_hashed_and_revocable(accounts):
    await accounts.create_tenant("acme")
    plaintext, record = await accounts.create_key("acme", name="ci", models=["m"], rpm=5, max_concurrency=2,
                                                 expires_at=time.time() + 60)
    assert plaintext.startswith(KEY_PREFIX) and looks_like_key(plaintext)
    assert not looks_like_key(plaintext[:-20]) and not looks_like_key(plaintext + "!")
    assert await accounts.lookup(plaintext) == record
    assert await accounts.lookup_digest(hash_key(plaintext)) == record
    assert await accounts.lookup(plaintext[:-1] + ("x" if plaintext[-1] != "x" else "y")) is None
    assert record.usable(time.time()) and not record.usable(time.time() + 61)
    principal = record.principal()
    assert (principal.tenant, principal.rpm, principal.max_concurrency, principal.may_use("m"), principal.may_use("n")) == (
        "acme", 5, 2, True, False,
    )
    assert [r.id for r in await accounts.list_keys("acme")] == [record.id]
    revoked = await accounts.revoke_key(record.id)
    assert revoked.revoked_at is not None and not revoked.usable(time.time())
    again = await accounts.revoke_key(record.id)
    assert again.revoked_at == revoked.revoked_at  # the first revocation time stays
    with pytest.raises(ApiError):
        await accounts.revoke_key("key_unknown")
    with pytest.raises(ApiError):
        await accounts.create_key("nobody")
