"""Fixtures shared by the whole suite: a simulated provider, gateways, Redis prefixes."""

from __future__ import annotations

import asyncio

import pytest

from proxy.core.settings import StoreSettings
from proxy.devtools.mock_upstream import MockUpstream
from proxy.store.store import Store
from proxy.web.app import create_app
from proxy.web.body import RUNNER_OPTIONS
from proxy.web.middlewares import AccessLogger
from tests.support import (
    REDIS_URL,
    OwnRedis,
    RunningGateway,
    cleanup_redis_prefix,
    make_settings,
    spawn_gateway,
    unique_prefix,
)


@pytest.fixture
async def mock():
    """The simulated provider on a real loopback socket."""
    upstream = MockUpstream()
    upstream.url = await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
async def redis_prefix():
    """A key prefix on the real Redis, deleted after the test."""
    prefix = unique_prefix()
    yield prefix
    await cleanup_redis_prefix(prefix)


@pytest.fixture
async def shared_store(redis_prefix):
    """The test's own `Store` on the real Redis under its prefix: what its gateway processes share."""
    store = Store(StoreSettings(url=REDIS_URL, prefix=redis_prefix))
    await store.connect()
    yield store
    await store.close()


@pytest.fixture
async def replicas(tmp_path, redis_prefix):
    """Start `sovereign serve` processes (replicas) from config data: ``await replicas(data, 2)``; all stopped after.

    Stopped before `redis_prefix` is cleaned up, so none writes under it afterwards.
    """
    started: list = []

    async def start(data: dict, count: int = 1, name: str = "gw") -> list:
        names = [f"{name}{len(started) + i}" for i in range(count)]
        results = await asyncio.gather(*(spawn_gateway(data, tmp_path, name=n) for n in names), return_exceptions=True)
        started.extend(r for r in results if not isinstance(r, BaseException))  # stopped even if another failed
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    yield start
    for proc, _ in started:
        proc.stop()


@pytest.fixture
async def gateway_factory(aiohttp_server):
    """Start gateways from settings on loopback sockets (pytest-aiohttp's server fixture); all closed after the test."""
    started: list[RunningGateway] = []

    async def start(settings) -> RunningGateway:
        app = create_app(settings)
        # The same runner options as `sovereign serve` (TestServer already cancels handlers on disconnect).
        server = await aiohttp_server(app, port=0, access_log_class=AccessLogger, **RUNNER_OPTIONS)
        running = RunningGateway(server=server, app=app, base_url=f"http://127.0.0.1:{server.port}")
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.close()


@pytest.fixture
async def passthrough(mock, gateway_factory) -> RunningGateway:
    """A gateway with no units in front of the simulated provider."""
    return await gateway_factory(make_settings(mock.url, admin_token=None))


@pytest.fixture
async def own_redis(tmp_path):
    """A private redis-server (never the shared one) that the test may stop, pause or restart."""
    server = OwnRedis(tmp_path)
    await asyncio.to_thread(server.start)
    yield server
    server.kill()


@pytest.fixture(params=["redis", "memory"])
def store_url(request, redis_prefix):
    """Parity: the same test on the real Redis and on the embedded store."""
    return REDIS_URL if request.param == "redis" else "memory://"
