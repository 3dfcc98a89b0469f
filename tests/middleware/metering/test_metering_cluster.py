"""The metering scripts on a real three-node Redis Cluster (all keys of a script share the tenant's slot)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import pytest

from proxy.store.accounts import Accounts, now_ms
from proxy.core.settings import StoreSettings
from middleware.metering.unit import HOLD_RESERVE, HOLD_SETTLE
from proxy.store.store import Store
from tests.middleware.metering.test_metering import MESSAGES, PIPELINE, prompt_tokens
from tests.support import free_port, make_settings

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server/redis-cli are not installed: cannot start a local Redis Cluster",
)


@pytest.fixture
def cluster(tmp_path):
    """Three cluster-enabled redis-server nodes in tmp_path, joined into one cluster; stopped afterwards."""
    ports = [_node_port() for _ in range(3)]
    nodes = [
        subprocess.Popen(
            ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(tmp_path / f"nodes-{p}.conf"), "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        for p in ports:
            _until(lambda: _cli(p, "ping") == "PONG")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        _until(lambda: all("cluster_state:ok" in _cli(p, "cluster", "info") for p in ports))
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=true"
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(10)


def _node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout.strip()


def _until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "redis cluster did not come up"
        time.sleep(0.1)


async def test_tenant_reserve_settle_and_ledger_on_a_cluster(cluster):
    store = Store(StoreSettings(url=cluster, prefix="sovcluster"))
    await store.connect()
    try:
        accounts = Accounts(store)
        tenants = [f"tenant-{i}" for i in range(6)]  # spread over the nodes' slots
        for tenant in tenants:
            await accounts.create_tenant(tenant, 100)
            applied, _ = await accounts.add_credits(tenant, 50, "once")
            again, view = await accounts.add_credits(tenant, 50, "once")
            assert (applied, again, view["balance"]) == (True, False, 150)
            k = store.tenant_key
            keys = [k(tenant, "tenant"), k(tenant, "holds"), k(tenant, "hold_amounts"), k(tenant, "ledger"), k(tenant, "ledger_ids")]
            now = now_ms()
            assert await store.run(HOLD_RESERVE, keys[:3], ["h1", 120, now, now + 60_000]) == [1, 30]
            assert await store.run(HOLD_RESERVE, keys[:3], ["h2", 31, now, now + 60_000]) == [0, 30]
            assert (await accounts.tenant(tenant))["reserved"] == 120
            entry = '{"type":"charge","request_id":"r1","credits":-40}'
            assert await store.run(HOLD_SETTLE, keys, ["h1", 40, "req:r1", entry, now_ms()]) == [1, 110]
            assert await store.run(HOLD_SETTLE, keys, ["h1", 40, "req:r1", entry, now_ms()]) == [0, 110]
            # A hold that expired is swept by the next script.
            assert await store.run(HOLD_RESERVE, keys[:3], ["h3", 10, now, now - 1]) == [1, 100]
            view = await accounts.tenant(tenant)
            assert (view["balance"], view["reserved"]) == (110, 0)
            ledger = await accounts.ledger(tenant)
            assert [e["id"] for e in ledger] == ["req:r1", "topup:once", f"grant:{tenant}"]
            assert sum(e["credits"] for e in ledger) == view["balance"] == ledger[0]["balance_after"]
        slots = {int(await store.redis.cluster_keyslot(store.tenant_key(t, "tenant"))) for t in tenants}
        assert len(slots) == len(tenants)
    finally:
        await store.close()


async def test_metered_request_through_a_gateway_on_a_cluster(cluster, mock, gateway_factory):
    settings = make_settings(mock.url, store_url=cluster, prefix="sovcluster", pipeline=PIPELINE, admin_token=None)
    running = await gateway_factory(settings)
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme", 1000)
    key, _ = await accounts.create_key("acme")
    reply = await running.openai(key).chat.completions.create(model="sovereign-alpha", messages=MESSAGES, max_tokens=5)
    assert reply.usage.completion_tokens == 5
    await running.gateway.drain()  # JSON replies settle in the background
    view = await accounts.tenant("acme")
    assert (view["balance"], view["reserved"]) == (1000 - prompt_tokens(MESSAGES) - 10, 0)
    assert (await accounts.ledger("acme"))[0]["usage_source"] == "reported"


async def test_checkpointed_holds_of_a_dead_replica_are_swept_and_charged_on_a_cluster(cluster):
    """Checkpoint, deadline index and sweeper on three nodes: the index shards and the tenants live in different slots."""
    from middleware.metering.sweeper import HoldSweeper, checkpoint_keys, index_key
    from middleware.metering.unit import HOLD_CHECKPOINT

    store = Store(StoreSettings(url=cluster, prefix="sovcluster-cp"))
    await store.connect()
    try:
        accounts = Accounts(store)
        sweeper = HoldSweeper(store, interval=60)
        tenants = [f"cp-tenant-{i}" for i in range(6)]
        now = now_ms()
        for tenant in tenants:
            await accounts.create_tenant(tenant, 100)
            keys = checkpoint_keys(store, tenant)
            assert await store.run(HOLD_RESERVE, keys[:3], ["h1", 60, now, now + 60_000]) == [1, 40]
            entry = '{"type":"charge","request_id":"r1","credits":-25,"estimated":true,"reason":"replica_lost"}'
            # The replica checkpointed 25 credits of output, then died: the hold expired 1 ms ago.
            assert await store.run(HOLD_CHECKPOINT, [keys[1], keys[2], keys[5], keys[6]], ["h1", 25, "req:r1", entry, now - 1]) == 1
            await sweeper.register(tenant, "h1", now - 1)
        shards = {int(await store.redis.cluster_keyslot(index_key(store, t))) for t in tenants}
        assert len(shards) > 1
        assert await sweeper.sweep() == len(tenants)
        for tenant in tenants:
            view = await accounts.tenant(tenant)
            assert (view["balance"], view["reserved"]) == (75, 0)
            ledger = await accounts.ledger(tenant)
            assert ledger[0]["id"] == "req:r1" and ledger[0]["estimated"] is True and ledger[0]["balance_after"] == 75
        assert await sweeper.sweep() == 0  # the index is empty again: nothing charged twice
        # A checkpointed hold its live replica settled: at expiry the sweep only drops the leftover checkpoint.
        tenant, keys = tenants[0], checkpoint_keys(store, tenants[0])
        assert (await store.run(HOLD_RESERVE, keys[:3], ["h2", 30, now_ms(), now_ms() + 60_000]))[0] == 1
        entry = '{"type":"charge","request_id":"r2","credits":-10,"estimated":true,"reason":"replica_lost"}'
        assert await store.run(HOLD_CHECKPOINT, [keys[1], keys[2], keys[5], keys[6]], ["h2", 10, "req:r2", entry, now_ms() + 50]) == 1
        await sweeper.register(tenant, "h2", now_ms() + 50)
        final = '{"type":"charge","request_id":"r2","credits":-20}'
        assert await store.run(HOLD_SETTLE, keys[:5], ["h2", 20, "req:r2", final, now_ms()]) == [1, 55]
        await asyncio.sleep(0.1)
        assert await sweeper.sweep() == 1
        view = await accounts.tenant(tenant)
        assert (view["balance"], view["reserved"]) == (55, 0)
        assert not await store.redis.exists(keys[5]) and not await store.redis.exists(keys[6])
        assert [e["credits"] for e in await accounts.ledger(tenant)][:2] == [-20, -25]
    finally:
        await store.close()
