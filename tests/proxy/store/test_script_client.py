"""The pipelined script client, against real redis-server processes and real failures."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import AuthenticationError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.core.errors import StoreUnavailable
from proxy.core.settings import StoreSettings
from proxy.store.script_client import ScriptClient, encode_command
from proxy.store.store import Script, Store
from tests.support import OwnRedis, eventually, free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

ECHO = Script("echo", "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}")
SLEEPY = Script("incr", "return redis.call('INCR', KEYS[1])")


def test_commands_are_resp_arrays():
    assert encode_command("EVALSHA", "ab", 1, b"k", 2.5) == b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n$3\r\n2.5\r\n"


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(own_redis):
    client = ScriptClient(own_redis.url, timeout=2)
    try:
        replies = await asyncio.gather(*(ECHO(client, [f"k{i}"], [f"v{i}", i]) for i in range(500)))
        assert replies == [[f"k{i}", f"v{i}", i + 1] for i in range(500)]
        counts = await asyncio.gather(*(SLEEPY(client, ["counter"], []) for _ in range(300)))
        assert sorted(counts) == list(range(1, 301))
    finally:
        await client.aclose()


async def test_a_forgotten_script_is_loaded_again(own_redis):
    client = ScriptClient(own_redis.url, timeout=2)
    try:
        with pytest.raises(NoScriptError):
            await client.evalsha(ECHO.sha, 1, "k", "v", 1)
        assert await ECHO(client, ["k"], ["v", 1]) == ["k", "v", 2]  # Script reloads on NOSCRIPT
        await client._call("SCRIPT", "FLUSH")
        assert await ECHO(client, ["k"], ["v", 2]) == ["k", "v", 3]
        with pytest.raises(ResponseError):
            await client._call("NOSUCHCOMMAND")
    finally:
        await client.aclose()


async def test_a_hung_redis_times_out_and_the_client_recovers(own_redis):
    client = ScriptClient(own_redis.url, timeout=0.3)
    try:
        assert await SLEEPY(client, ["n"], []) == 1
        await asyncio.to_thread(own_redis.pause)
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(SLEEPY(client, ["n"], []) for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results)
        assert asyncio.get_running_loop().time() - started < 1.5  # one watchdog, not a timer per command
        await asyncio.to_thread(own_redis.resume)
        assert await SLEEPY(client, ["n"], []) >= 2
    finally:
        await client.aclose()


def test_a_stalled_event_loop_is_not_a_late_redis(own_redis):
    """Commands queued, then the loop blocked for twice the timeout before it writes them: no timeout.

    A long loop iteration (hundreds of requests at once), a GC pause or a
    CPU-throttled container delay the write; the timeout is Redis's time to
    answer, so it counts from the write. Run on asyncio's loop and uvloop's
    (production's), whose timer and I/O orders differ.
    """
    async def stalled_calls() -> list[object]:
        client = ScriptClient(own_redis.url, timeout=0.3)
        try:
            assert await SLEEPY(client, ["stall"], []) >= 1  # connected, script loaded
            results = []
            for iterations_before_the_stall in (0, 1, 3):
                calls = asyncio.gather(*(SLEEPY(client, ["stall"], []) for _ in range(50)), return_exceptions=True)
                for _ in range(iterations_before_the_stall):
                    await asyncio.sleep(0)
                time.sleep(0.6)  # the loop is blocked: queued commands wait, written ones' replies wait unread
                results += await calls
            return results
        finally:
            await client.aclose()

    for loop_factory in (None, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(stalled_calls())
        assert [r for r in results if isinstance(r, BaseException)] == []


async def test_a_redis_still_loading_its_data_is_a_store_outage(tmp_path):
    """Restarted, Redis answers LOADING until its data is in memory: store down (503), not a bug (500).

    A real restart with enough data (and Redis's own ``key-load-delay``) to
    be loading for a while; both clients (the script client and redis-py).
    """
    redis = OwnRedis(tmp_path, "--enable-debug-command", "yes")
    redis.start()
    try:
        admin = aioredis.from_url(redis.url)
        await admin.execute_command("DEBUG", "POPULATE", 10_000)
        await admin.bgrewriteaof()
        await eventually(lambda: _rewrite_done(admin), timeout=10)
        await admin.aclose()
        redis.stop()
        # Slow loading (key-load-delay), answering clients often while it loads (events every 1 KB).
        redis.start("--key-load-delay", "200", "--loading-process-events-interval-bytes", "1024", wait=False)
        store = Store(StoreSettings(url=redis.url, prefix="loading", timeout=2))
        await store.connect()
        try:
            assert store.script_client is not None
            scripts: list[str] = []  # through the script client
            commands: list[str] = []  # through redis-py
            while "served" not in scripts[-1:] or "served" not in commands[-1:]:
                assert len(scripts) < 400, (scripts, commands)
                scripts.append(await _outcome(store.run(SLEEPY, ["n"], [])))
                commands.append(await _outcome(store.redis.get("n")))
                await asyncio.sleep(0.02)
            # Any other error (a ResponseError: the old 500) escapes `_outcome` and fails the test.
            assert "BusyLoadingError" in scripts and "BusyLoadingError" in commands, (scripts, commands)
        finally:
            await store.close()
    finally:
        redis.kill()


async def _outcome(call: Any) -> str:
    """"served", or the cause of the StoreUnavailable it raised."""
    try:
        await call
    except StoreUnavailable as exc:
        return type(exc.__cause__).__name__
    return "served"


async def _rewrite_done(admin: aioredis.Redis) -> bool:
    return (await admin.info("persistence"))["aof_rewrite_in_progress"] == 0


async def test_a_replica_refusing_writes_is_a_store_outage(tmp_path):
    """Pointed at a replica (a failover the deployment has not followed yet): READONLY is store down, not a bug."""
    primary = OwnRedis(tmp_path / "primary")
    primary.dir.mkdir()
    primary.start()
    replica = OwnRedis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    replica.dir.mkdir()
    replica.start()
    store = Store(StoreSettings(url=replica.url, prefix="replica"))
    await store.connect()
    client = ScriptClient(replica.url, timeout=2)
    try:
        with pytest.raises(ReadOnlyError):
            await SLEEPY(client, ["n"], [])
        with pytest.raises(StoreUnavailable) as refused:
            await store.run(SLEEPY, ["n"], [])
        assert isinstance(refused.value.__cause__, ReadOnlyError)
        with pytest.raises(StoreUnavailable):
            await store.redis.set("n", 1)
    finally:
        await client.aclose()
        await store.close()
        replica.kill()
        primary.kill()


async def test_a_restarted_redis_fails_pending_calls_then_reconnects(own_redis):
    client = ScriptClient(own_redis.url, timeout=2)
    try:
        assert await SLEEPY(client, ["r"], []) == 1
        await asyncio.to_thread(own_redis.stop)
        with pytest.raises(RedisConnectionError):
            await SLEEPY(client, ["r"], [])
        await asyncio.to_thread(own_redis.start)
        assert await SLEEPY(client, ["r"], []) == 2  # data kept, script reloaded
    finally:
        await client.aclose()


async def test_nothing_listening_is_a_connection_error():
    client = ScriptClient(f"redis://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(RedisConnectionError):
        await SLEEPY(client, ["x"], [])


async def test_password_and_database_from_the_url(tmp_path):
    own = OwnRedis(tmp_path, "--requirepass", "s3cret")
    await asyncio.to_thread(own.start)
    try:
        wrong = ScriptClient(f"redis://:nope@127.0.0.1:{own.port}/0", timeout=1)
        with pytest.raises(AuthenticationError):
            await SLEEPY(wrong, ["x"], [])
        await wrong.aclose()
        client = ScriptClient(f"redis://:s3cret@127.0.0.1:{own.port}/3", timeout=1)
        assert await SLEEPY(client, ["in-db-3"], []) == 1
        assert await client._call("DBSIZE") == 1
        await client._call("SELECT", 0)
        assert await client._call("DBSIZE") == 0
        await client.aclose()
    finally:
        own.kill()


def test_cluster_and_memory_urls_use_redis_py():
    assert ScriptClient.supports("redis://h:1/0") and ScriptClient.supports("rediss://h:1/0")
    assert not ScriptClient.supports("redis://h:1/0?cluster=true")
    assert not ScriptClient.supports("memory://")


def test_urls_with_options_stay_with_redis_py():
    # redis-py reads ?db= and TLS options; both clients must use the same database.
    assert not ScriptClient.supports("redis://h:1?db=5")
    assert not ScriptClient.supports("rediss://h:1/0?ssl_cert_reqs=none")
    assert not ScriptClient.supports("unix:///tmp/redis.sock")


async def test_db_in_the_query_keeps_scripts_and_commands_in_one_database(tmp_path):
    from proxy.store.accounts import Accounts
    from proxy.core.settings import StoreSettings
    from proxy.store.store import Store

    own = OwnRedis(tmp_path)
    await asyncio.to_thread(own.start)
    try:
        store = Store(StoreSettings(url=f"redis://127.0.0.1:{own.port}?db=5", prefix="dbq"))
        await store.connect()
        accounts = Accounts(store)
        await accounts.create_tenant("t1", 500)  # a script
        assert [e["credits"] for e in await accounts.ledger("t1")] == [500]  # read by redis-py
        assert await store.redis.dbsize() > 0
        await store.close()
    finally:
        own.kill()


async def _reads_processed(info_client) -> int:
    return (await info_client.info("stats"))["total_reads_processed"]


async def test_deferred_commands_ride_along_with_the_next_urgent_write(own_redis):
    """Settlements sent deferred over several loop iterations reach Redis in one read with the next hold."""
    client = ScriptClient(own_redis.url, timeout=2)
    info = aioredis.from_url(own_redis.url)
    try:
        assert await ECHO(client, ["warm"], ["v", 0]) == ["warm", "v", 1]  # connected, script loaded
        before = await _reads_processed(info)
        deferred = []
        for i in range(3):  # three loop iterations: urgent sends would make three writes
            deferred.append(asyncio.ensure_future(ECHO(client.deferred, [f"d{i}"], ["v", i])))
            await asyncio.sleep(0)
        assert await ECHO(client, ["urgent"], ["v", 9]) == ["urgent", "v", 10]
        assert await asyncio.gather(*deferred) == [[f"d{i}", "v", i + 1] for i in range(3)]
        # One read for all four commands, one for the INFO call that measures it.
        assert await _reads_processed(info) - before == 2
    finally:
        await info.aclose()
        await client.aclose()


async def test_a_deferred_command_alone_still_goes_out(own_redis):
    client = ScriptClient(own_redis.url, timeout=2)
    try:
        assert await asyncio.wait_for(ECHO(client.deferred, ["k"], ["v", 1]), 1) == ["k", "v", 2]
        assert await asyncio.wait_for(SLEEPY(client.deferred, ["n"], []), 1) == 1
    finally:
        await client.aclose()
