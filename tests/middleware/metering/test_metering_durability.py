"""Nothing served goes unbilled: Redis outages, a SIGTERM with settlements pending (one process, two workers), a SIGKILLed replica.

Real processes and real kills throughout: a private redis-server (OwnRedis)
SIGKILLed and restarted on its append-only file, `sovereign serve`
subprocesses stopped with SIGTERM or SIGKILL, streams and JSON requests over
real sockets from the simulated provider.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from middleware.metering.pricing import output_estimate
from middleware.metering.sweeper import SHARDS
from proxy.core.settings import StoreSettings
from proxy.store.accounts import Accounts
from proxy.store.store import Store
from proxy.store.usage import query_usage
from proxy.web.workers import WORKER_HEADER
from tests.middleware.metering.test_metering import MESSAGES, PIPELINE, assert_ledger_matches, new_tenant
from tests.proxy.web.test_workers import served_by
from tests.support import REDIS_URL, OwnRedis, make_settings, settings_data, spawn_gateway, until

needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@dataclass
class Streamed:
    """One stream as the client saw it: its request id, content chunks (with arrival times) and how it ended."""

    request_id: str = ""
    status: int = 0
    worker: str = ""  # the pid of the worker that served it (WORKER_HEADER; only with several workers)
    chunks: list[tuple[float, str]] = field(default_factory=list)
    done: bool = False  # got [DONE]
    first: asyncio.Event = field(default_factory=asyncio.Event)

    def received_by(self, moment: float) -> tuple[int, int]:
        """(content chunks, characters) received before `moment` (time.monotonic)."""
        texts = [text for at, text in self.chunks if at <= moment]
        return len(texts), sum(map(len, texts))


async def stream(http: aiohttp.ClientSession, url: str, key: str, chunks: int, delay_ms: int, max_tokens: int,
                 seen: Streamed | None = None) -> Streamed:
    """Read one slow stream from the simulated provider (`chunks` content chunks `delay_ms` apart) to its end."""
    seen = seen or Streamed()
    seen.request_id = "stream-" + uuid.uuid4().hex  # streams are prepared before the gateway could add its header
    headers = {"Authorization": f"Bearer {key}", "x-mock-chunks": str(chunks), "x-mock-delay-ms": str(delay_ms),
               "X-Request-ID": seen.request_id}
    body = {"model": "sovereign-alpha", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    try:
        async with http.post(url + "/chat/completions", json=body, headers=headers) as resp:
            seen.status = resp.status
            seen.worker = resp.headers.get(WORKER_HEADER, "")
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    seen.done = True
                elif line.startswith(b"data: {"):
                    delta = orjson.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        seen.chunks.append((time.monotonic(), delta["content"]))
                        seen.first.set()
    except aiohttp.ClientError:
        pass  # the gateway was killed under it
    seen.first.set()
    return seen


async def json_load(http: aiohttp.ClientSession, url: str, key: str, stop: asyncio.Event, served: list[str], statuses: Counter) -> None:
    body = {"model": "sovereign-alpha", "messages": MESSAGES, "max_tokens": 3}
    while not stop.is_set():
        async with http.post(url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
            await resp.read()
            statuses[resp.status] += 1
            if resp.status == 200:
                served.append(resp.headers["x-request-id"])
        await asyncio.sleep(0.02)


async def assert_each_served_charged_once(accounts: Accounts, tenant: str, served: list[str]) -> list[dict]:
    ledger = await accounts.ledger(tenant, limit=100_000)
    charges = [e for e in ledger if e["type"] == "charge"]
    per_request = Counter(e["request_id"] for e in charges)
    assert len(served) == len(set(served))
    missing = set(served) - set(per_request)
    assert not missing, f"{len(missing)} served requests without a ledger entry"
    assert set(per_request) == set(served)  # nothing charged that was not served
    assert max(per_request.values()) == 1  # nothing charged twice
    assert len({e["id"] for e in ledger}) == len(ledger)
    view = await assert_ledger_matches(accounts, tenant)
    assert view["reserved"] == 0
    return charges


async def test_a_spool_dir_that_cannot_be_written_is_refused_at_start_up(mock, tmp_path):
    """Found at start-up, with the field named, rather than at the exit that needs the spool."""
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    data = settings_data(mock.url, store_url=REDIS_URL, pipeline=PIPELINE, admin_token=None, store={"spool_dir": str(taken)})
    config = tmp_path / "bad-spool.yaml"
    config.write_text(yaml.safe_dump(data))
    for command in ("serve", "check-config"):
        proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", command, "--config", str(config)],
                                       capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, (command, proc.stderr)
        assert f"store.spool_dir: cannot write to {taken}" in proc.stderr and "Traceback" not in proc.stderr


@needs_redis_server
async def test_a_spool_lost_after_start_up_logs_each_settlement_lost_and_still_exits_cleanly(mock, tmp_path):
    """The volume went away meanwhile: SIGTERM during an outage names every uncharged request and exits 0."""
    redis, spool, data, store = await _spooling_setup(mock, tmp_path)
    first = None
    try:
        first, base = await spawn_gateway(data, tmp_path, "first")
        await store.connect()
        tenant, key = await new_tenant(Accounts(store), 1_000_000)
        shutil.rmtree(spool, ignore_errors=True)
        spool.write_text("the mount is gone")  # a directory can no longer be made there
        async with aiohttp.ClientSession() as http:
            results = await _streams_through_an_outage(http, base, key, redis, 3)
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 20) == 0
        lost = [line for line in first.output().splitlines() if '"metering.settle_failed"' in line]
        assert sorted(orjson.loads(line)["request_id"] for line in lost) == sorted(r.request_id for r in results)
        assert "Traceback" not in first.output()
    finally:
        if first is not None:
            first.stop()
        await store.close()
        redis.kill()


@needs_redis_server
@pytest.mark.timeout(180)
@pytest.mark.parametrize("outage", [15, 60], ids=["15s", "60s"])
async def test_a_redis_outage_under_open_streams_and_json_load_loses_no_settlement(mock, gateway_factory, tmp_path, outage):
    """Redis SIGKILLed for 15 s (60 s) 1 s into 20 streams plus JSON load: afterwards every 200 is charged exactly once.

    The streams end during the outage, so their settlements wait; past the
    memory bound (5) they go to the spool, which is replayed once Redis is back.
    The 60 s case is the suite's one long test: it is the claim itself.
    """
    redis = OwnRedis(tmp_path)
    await asyncio.to_thread(redis.start)
    try:
        settings = make_settings(
            mock.url, store_url=redis.url, pipeline=PIPELINE, admin_token=None,
            store={"timeout": 0.5, "spool_dir": str(tmp_path / "spool")},
            units={"metering": {"checkpoint_seconds": 0.5, "pending_settlements_limit": 5}},
        )
        running = await gateway_factory(settings)
        metering = running.gateway.unit("metering")
        accounts = Accounts(running.gateway.store)
        tenant, key = await new_tenant(accounts, 10_000_000)
        served: list[str] = []
        statuses: Counter = Counter()
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as http:
            workers = [asyncio.create_task(json_load(http, running.v1, key, stop, served, statuses)) for _ in range(4)]
            opened = [Streamed() for _ in range(20)]
            streams = [asyncio.create_task(stream(http, running.v1, key, 40, 100, 100, s)) for s in opened]  # 4 s each
            await asyncio.gather(*(s.first.wait() for s in opened))
            await asyncio.sleep(1.0)
            assert sum(1 for t in streams if not t.done()) == 20
            await asyncio.to_thread(redis.kill)
            killed = time.monotonic()
            await asyncio.wait(streams, timeout=10)
            results = [t.result() for t in streams]
            assert all(r.status == 200 and r.done and len(r.chunks) == 40 for r in results)  # held, so relayed to the end
            await until(lambda: metering.settlements.count >= 20, timeout=5)  # the streams' settlements, at least
            async with http.get(running.base_url + "/readyz") as resp:
                ready = await resp.json()
            assert resp.status == 503 and {"store_unreachable", "settlements_pending"} <= set(ready["reasons"])
            assert running.gateway.metrics.settlements_pending._value.get() == metering.settlements.count
            assert metering.settlements.spool.lines > 0  # past the memory bound: on disk
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - killed)))
            outage_statuses = dict(statuses)
            await asyncio.to_thread(redis.start)
            # Back within the retry cap (5 s) plus a spool replay; JSON load keeps going meanwhile.
            await until(lambda: metering.settlements.count == 0, timeout=15)
            async with http.get(running.base_url + "/readyz") as resp:
                assert resp.status == 200 and "reasons" not in await resp.json()
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*workers)
        await running.gateway.drain()
        assert set(statuses) <= {200, 503} and outage_statuses.get(503)
        assert statuses[200] > outage_statuses.get(200, 0)  # served again after the outage
        served_all = served + [r.request_id for r in results]
        await assert_each_served_charged_once(accounts, tenant, served_all)
        assert not list((tmp_path / "spool").glob("*.jsonl")) or all(
            p.stat().st_size == 0 for p in (tmp_path / "spool").glob("*.jsonl")
        )
    finally:
        redis.kill()


async def _spooling_setup(mock, tmp_path, **server) -> tuple[OwnRedis, Path, dict, Store]:
    """A private Redis (started) and the settings of gateways on it that spool to `tmp_path/spool`."""
    redis = OwnRedis(tmp_path)
    await asyncio.to_thread(redis.start)
    spool = tmp_path / "spool"
    data = settings_data(
        mock.url, store_url=redis.url, pipeline=PIPELINE, admin_token=None,
        store={"timeout": 0.5, "spool_dir": str(spool)}, server={"drain_seconds": 5, **server},
    )
    return redis, spool, data, Store(StoreSettings(url=redis.url, prefix=data["store"]["prefix"]))


async def _streams_through_an_outage(http: aiohttp.ClientSession, base: str, key: str, redis: OwnRedis, count: int) -> list[Streamed]:
    """`count` 2-second streams, Redis killed once all have started; returns them once their settlements are pending."""
    opened = [Streamed() for _ in range(count)]
    streams = [asyncio.create_task(stream(http, base + "/v1", key, 20, 100, 100, s)) for s in opened]
    await asyncio.gather(*(s.first.wait() for s in opened))
    await asyncio.sleep(0.3)
    await asyncio.to_thread(redis.kill)
    results = await asyncio.gather(*streams)
    assert all(r.status == 200 and r.done for r in results)
    # The streams' settlements fail and wait just after their last chunk (under workers
    # /metrics sums the gauge over the live ones).
    for _ in range(100):
        async with http.get(base + "/metrics") as resp:
            if f"sovereign_settlements_pending {count}.0" in await resp.text():
                return results
        await asyncio.sleep(0.05)
    raise AssertionError(f"the {count} settlements were never reported pending")


@needs_redis_server
async def test_sigterm_during_an_outage_spools_pending_settlements_and_the_next_process_writes_them_once(mock, tmp_path):
    redis, spool, data, store = await _spooling_setup(mock, tmp_path)
    first = second = None
    try:
        first, base = await spawn_gateway(data, tmp_path, "first")
        await store.connect()
        accounts = Accounts(store)
        tenant, key = await new_tenant(accounts, 1_000_000)
        async with aiohttp.ClientSession() as http:
            results = await _streams_through_an_outage(http, base, key, redis, 10)
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 503 and {"store_unreachable", "settlements_pending"} <= set((await resp.json())["reasons"])
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 20) == 0
        files = list(spool.glob("settlements-*.jsonl"))
        assert len(files) == 1
        lines = files[0].read_bytes().splitlines()
        assert sorted(orjson.loads(line)["request_id"] for line in lines) == sorted(r.request_id for r in results)
        # A second copy of the spool (replaying it twice must not charge twice), ending in a torn line.
        (spool / "settlements-copy.jsonl").write_bytes(b"\n".join(lines) + b'\n{"script": "hold_settle", "keys": ["tru')
        await asyncio.to_thread(redis.start)
        held = await accounts.tenant(tenant)
        assert held["reserved"] > 0  # the holds of the spooled settlements are still open
        assert not [e for e in await accounts.ledger(tenant) if e["type"] == "charge"]
        second, _ = await spawn_gateway(data, tmp_path, "second")
        await until(lambda: not list(spool.glob("*.jsonl")), timeout=15)
        await assert_each_served_charged_once(accounts, tenant, [r.request_id for r in results])
        assert "metering.spool_line_skipped" in second.output()
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        await store.close()
        redis.kill()


@needs_redis_server
async def test_a_replica_sigkilled_during_an_outage_has_spooled_its_settlements_and_the_next_process_writes_them(mock, tmp_path):
    """With a spool, a settlement the store could not take is on disk at once, not only at SIGTERM.

    Before, they waited in memory until the memory bound or the shutdown, and a
    replica killed outright lost every one of the outage: served, never billed.
    """
    redis, spool, data, store = await _spooling_setup(mock, tmp_path)
    first = second = None
    try:
        first, base = await spawn_gateway(data, tmp_path, "first")
        await store.connect()
        accounts = Accounts(store)
        tenant, key = await new_tenant(accounts, 1_000_000)
        async with aiohttp.ClientSession() as http:
            results = await _streams_through_an_outage(http, base, key, redis, 10)

        def spooled() -> list[str]:
            return [orjson.loads(line)["request_id"] for path in spool.glob("settlements-*.jsonl")
                    for line in path.read_bytes().splitlines()]

        await until(lambda: len(spooled()) == len(results), timeout=10)
        first.signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
        assert sorted(spooled()) == sorted(r.request_id for r in results)
        await asyncio.to_thread(redis.start)
        second, _ = await spawn_gateway(data, tmp_path, "second")
        await until(lambda: not list(spool.glob("*.jsonl")), timeout=15)
        await assert_each_served_charged_once(accounts, tenant, [r.request_id for r in results])
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        await store.close()
        redis.kill()


@needs_redis_server
@pytest.mark.timeout(180)
async def test_under_two_workers_each_spools_its_own_settlements_and_two_new_workers_write_them_once(mock, tmp_path):
    """`--workers 2` sharing one spool_dir: a file per worker at SIGTERM, and two new workers replaying them concurrently charge each request once."""
    redis, spool, data, store = await _spooling_setup(mock, tmp_path, workers=2)
    first = second = None
    try:
        first, base = await spawn_gateway(data, tmp_path, "first")
        await store.connect()
        accounts = Accounts(store)
        tenant, key = await new_tenant(accounts, 1_000_000)
        deadline = time.monotonic() + 15
        while len(set(await served_by(base + "/healthz", 4, method="GET"))) < 2:  # both workers accept
            assert time.monotonic() < deadline, "the second worker never answered"
        async with aiohttp.ClientSession() as http:
            results = await _streams_through_an_outage(http, base, key, redis, 24)
        serving = {r.worker for r in results}
        # SO_REUSEPORT spreads the 24 connections over both (all on one: p ≈ 1e-7).
        assert len(serving) == 2 and "" not in serving
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 30) == 0
        # One file per worker that served a stream, named by its pid, holding exactly that worker's streams.
        files = {path.name.split("-")[1]: path for path in spool.glob("settlements-*.jsonl")}
        assert set(files) == serving
        for worker, path in files.items():
            spooled = sorted(orjson.loads(line)["request_id"] for line in path.read_bytes().splitlines())
            assert spooled == sorted(r.request_id for r in results if r.worker == worker)
        await asyncio.to_thread(redis.start)
        assert not [e for e in await accounts.ledger(tenant) if e["type"] == "charge"]
        second, _ = await spawn_gateway(data, tmp_path, "second")  # both new workers find the orphans at start
        await until(lambda: not list(spool.glob("*.jsonl")), timeout=15)
        await assert_each_served_charged_once(accounts, tenant, [r.request_id for r in results])
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        await store.close()
        redis.kill()


@pytest.mark.timeout(120)
async def test_a_sigkilled_replica_s_streams_are_charged_at_their_checkpoints(mock, redis_prefix, shared_store, replicas):
    """20 streams, each with ≥ 10 s of output, on a replica that is SIGKILLed; the other replica's sweeper settles them.

    Each is charged at least what it had produced one checkpoint interval
    before the kill (plus one chunk's delay, the granularity at which a due
    checkpoint is taken), flagged estimated, within hold_ttl + 60 s; no hold is left.
    """
    hold_ttl, interval = 3.0, 1.0
    data = settings_data(
        mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=PIPELINE, admin_token=None,
        units={"metering": {"hold_ttl_seconds": hold_ttl, "checkpoint_seconds": interval, "sweep_seconds": 0.5}},
    )
    [(dying, base)] = await replicas(data, name="dying")
    [(survivor, _)] = await replicas(data, name="survivor")
    store = shared_store
    accounts = Accounts(store)
    tenant, _ = await new_tenant(accounts, 10_000_000)
    # A key with a budget: what the sweeper charges must count in it, and in the usage aggregates.
    key, record = await accounts.create_key(tenant, budget_credits=10**9, budget_period="total")
    async with aiohttp.ClientSession() as http:
        opened = [Streamed() for _ in range(20)]
        tasks = [asyncio.create_task(stream(http, base + "/v1", key, 1000, 50, 2000, s)) for s in opened]  # 50 s each
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in opened)), 10)
        started = max(s.chunks[0][0] for s in opened)
        await asyncio.sleep(10.2 - (time.monotonic() - started))
        dying.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(dying.wait, 10)
        results = await asyncio.gather(*tasks)
    assert all(not r.done and r.chunks[-1][0] - r.chunks[0][0] >= 10.0 for r in results)  # ≥ 10 s of output each

    async def charges() -> list[dict]:
        return [e for e in await accounts.ledger(tenant, limit=1000) if e["type"] == "charge"]

    while len(await charges()) < 20:
        assert time.monotonic() - killed < hold_ttl + 60, "not settled within hold_ttl + 60 s"
        await asyncio.sleep(0.2)
    by_request = {e["request_id"]: e for e in await charges()}
    assert set(by_request) == {r.request_id for r in results}
    slack = 0.05 + 0.25  # one chunk's delay, and the checkpoint's own write
    for seen in results:
        entry = by_request[seen.request_id]
        assert entry["estimated"] is True and entry["reason"] == "replica_lost"
        assert entry["usage_source"] == "estimated"
        floor = output_estimate(*seen.received_by(killed - interval - slack))
        ceiling = output_estimate(len(seen.chunks) + 20, sum(len(t) for _, t in seen.chunks) + 20 * 6)
        assert floor <= entry["output_tokens"] <= ceiling, (floor, entry["output_tokens"], ceiling)
    view = await assert_ledger_matches(accounts, tenant)
    assert view["reserved"] == 0
    # Counted like any settlement (they used to be in the ledger only): usage, and the key's budget, its holds released.
    charged = -sum(e["credits"] for e in by_request.values())
    hour = int(time.time()) // 3600 * 3600
    usage = await query_usage(store, tenant, start=hour - 3600, end=hour + 3600)
    assert (sum(row["requests"] for row in usage), sum(row["credits"] for row in usage)) == (20, charged)
    assert await accounts.key_spending(record) == {"spent": charged, "held": 0}
    for part in ("holds", "hold_amounts", "checkpointed_holds", "hold_checkpoints", "hold_checkpoint_tails"):
        assert not await store.redis.exists(store.tenant_key(tenant, part)), part
    index = [store.global_key("hold_deadlines", "{%d}" % shard) for shard in range(SHARDS)]
    assert not [m for k in index for m in await store.redis.zrange(k, 0, -1) if m.startswith(tenant + "/")]
